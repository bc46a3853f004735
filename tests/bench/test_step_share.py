"""bench/step_share.py on the tiny bundle: the stand-in graph has no attention, keeps every output's
shape, and the table has a row per row count."""

from __future__ import annotations

import re
import shutil

import numpy as np
import onnx

from bench import step_share
from nmt import bundle as sb


def test_stand_in_graph_drops_attention_and_keeps_the_outputs(tiny_bundle):
    m = sb.read_manifest(tiny_bundle)
    model = onnx.load(str(tiny_bundle / sb.DECODER_SLOTS_FILE))
    bare = step_share.without_attention(model, m.d_model)
    ops = {n.op_type for n in bare.graph.node}
    assert not ops & {"GroupQueryAttention", "MultiHeadAttention"}
    assert {n.op_type for n in model.graph.node} >= {"GroupQueryAttention", "MultiHeadAttention"}
    rng = np.random.default_rng(0)
    shapes = []
    for graph in (model, bare):
        sess = step_share.session(graph, 1)
        io, _keep = step_share.bound(sess, 4, 3, 5, 8, rng)
        sess.run_with_iobinding(io)
        shapes.append([o.shape() for o in io.get_outputs()])
    assert shapes[0] == shapes[1]


def test_table_has_a_row_per_row_count(tiny_bundle, capsys):
    assert step_share.main(["--bundle", str(tiny_bundle), "--rows", "1,4", "--repeats", "1",
                            "--cached", "3", "--source-len", "5"]) == 0
    printed = capsys.readouterr().out
    rows = re.findall(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| -?\d+ \| -?[\d.]+% \|$", printed, re.M)
    assert [r[0] for r in rows] == ["1", "4"]
    assert all(float(step) > 0 and float(bare) > 0 for _, step, bare in rows)
    assert "load average before" in printed


def test_a_path_that_is_no_bundle_is_one_line_and_exit_2(tmp_path, capsys):
    assert step_share.main(["--bundle", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a model bundle" in err[0]


def test_a_bundle_without_the_slot_decoder_is_one_line_and_exit_2(tiny_bundle, tmp_path, capsys):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    (b / sb.DECODER_SLOTS_FILE).unlink()
    assert step_share.main(["--bundle", str(b)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and sb.DECODER_SLOTS_FILE in err[0] and err[0].startswith("error: ")
