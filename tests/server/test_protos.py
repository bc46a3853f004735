"""The checked-in generated code is what scripts/gen_protos.py makes from the .proto today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_current(tmp_path):
    gen = _gen_protos()
    fresh = gen.generate(tmp_path)
    checked_in = gen.generated_files(REPO)
    assert [p.relative_to(tmp_path) for p in fresh] == [p.relative_to(REPO) for p in checked_in]
    for new, old in zip(fresh, checked_in):
        assert old.is_file(), f"{old} missing: run scripts/gen_protos.py"
        assert new.read_text() == old.read_text(), f"{old} is stale: run scripts/gen_protos.py"


def test_generated_package_imports_and_has_the_service():
    from nmt.v1 import translator_pb2, translator_pb2_grpc

    service = translator_pb2.DESCRIPTOR.services_by_name["Translator"]
    methods = ["Translate", "TranslateStream", "TranslateIncremental", "GetModelInfo", "ReloadModel"]
    assert [m.name for m in service.methods] == methods
    assert hasattr(translator_pb2_grpc, "TranslatorStub")
    # "unset" is distinguishable from 0 for the options that have server defaults.
    opts = translator_pb2.DecodingOptions()
    assert not opts.HasField("beam_size") and not opts.HasField("length_penalty")
