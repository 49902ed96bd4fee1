"""Progress bars: drawn on a terminal, never into a pipe or file (`toolkit compile ... 2>&1 | cat`, CI logs)."""
import fcntl
import os
import pty
import select
import struct
import sys
import termios

import numpy as np
import onnx_ir as ir
import pytest

from toolkit import progress
from toolkit.export import save_graph
from toolkit.progress import progress_bar


@pytest.fixture
def terminal():
    """A pseudo-terminal: (a stream writing to it, a function reading what was drawn so far)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a new pty has 0 rows: tqdm draws none
    with open(child, "w") as stream:
        def drawn():
            stream.flush()
            out = b""
            while select.select([main], [], [], 0.2)[0]:  # a pty hands over what was written in pieces
                out += os.read(main, 65536)
            return out.decode()

        yield stream, drawn
    os.close(main)


def test_bar_is_drawn_on_a_terminal_unless_hidden(terminal, monkeypatch):
    stream, drawn = terminal
    monkeypatch.setattr(sys, "stderr", stream)  # here, not in the fixture: pytest sets its own before each test runs
    for _ in progress_bar(range(3), desc="shown", unit="tensor"):
        pass
    assert "shown" in drawn()
    for _ in progress_bar(range(3), desc="hidden", show=False):
        pass
    with progress_bar(desc="hidden", show=False) as bar:
        bar.update()
    assert drawn() == ""


def test_a_notebook_draws_its_bar_though_its_streams_are_not_terminals(monkeypatch):
    monkeypatch.setattr(progress, "IN_NOTEBOOK", True)
    with progress_bar(total=1) as bar:
        assert not bar.disable


def test_saving_a_graph_into_a_log_draws_no_bar(tmp_path, capfd):
    # the bar's total comes from the first saved tensor: drawn before it, a log read "0tensor [00:00, ?tensor/s]"
    x = ir.Value(name="x", shape=ir.Shape([4]), type=ir.TensorType(ir.DataType.FLOAT))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones(4, np.float32), name="w"))
    node = ir.node("Add", [x, w])
    model = ir.Model(ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 18}), ir_version=10)
    save_graph(model, tmp_path / "m.onnx", "writing the graph")
    assert (tmp_path / "m.onnx").is_file()
    assert capfd.readouterr().err == ""
