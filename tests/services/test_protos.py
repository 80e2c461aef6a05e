"""The gRPC contract: style rules of protos/, generated stubs current, wire helpers for tensors and error details."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _gen_protos()

EXPECTED_RPCS = {
    "ola.vision.v1.VisionEncoderService": {"EncodeImages": False, "EncodeVideo": False},
    "ola.audio.v1.AudioEncoderService": {"EncodeAudio": False},
    "ola.llm.v1.LLMService": {"Generate": True, "CountTokens": False},
    "ola.tts.v1.TTSService": {"Synthesize": True, "ListVoices": False},
    "ola.omni.v1.OmniService": {"Chat": True, "GetSession": False, "DeleteSession": False, "ListModelVersions": False},
    "ola.pipeline.v1.PipelineService": {
        "StartRun": False,
        "GetRun": False,
        "ListRuns": False,
        "WatchRun": True,
        "CancelRun": False,
    },
    "ola.models.v1.ModelService": {
        "ListVersions": False,
        "PromoteVersion": False,
        "StartRollout": False,
        "GetRollout": False,
        "AbortRollout": False,
        "PromoteRollout": False,
    },
}
CONTROL_PLANE = {"ola.pipeline.v1", "ola.models.v1"}  # training runs and model lifecycle: no model version to pin


# ------------------------------------------------------------------------------------------------------ the contract
def test_protos_follow_the_style_rules():
    assert gen.lint() == []


def test_lint_catches_violations(tmp_path):
    bad = tmp_path / "ola" / "foo" / "v2"
    bad.mkdir(parents=True)
    (bad / "x.proto").write_text(
        'syntax = "proto3";\npackage ola.foo.v2;\n'
        "// A colour.\nenum Color { RED = 0; }\n"
        "// A message.\nmessage M { string a = 1; }\n"
        "// A service.\nservice S {\n  // Does.\n  rpc Do(M) returns (M);\n}\n"
    )
    problems = "\n".join(gen.lint(tmp_path))
    assert "package 'ola.foo.v2' is not ola.<service>.v1" in problems
    assert "no file comment" in problems
    assert "field M.a has no leading comment" in problems
    assert "enum Color must start with COLOR_UNSPECIFIED = 0" in problems
    assert "enum value Color.RED has no leading comment" in problems
    assert "expected .ola.foo.v2.DoRequest" in problems
    assert "used by more than one rpc" in problems


def test_packages_services_and_streaming_rpcs():
    fds = gen.descriptor_set()
    packages = {f.package for f in fds.file}
    assert packages == {
        f"ola.{x}.v1" for x in ("common", "vision", "audio", "llm", "tts", "omni", "pipeline", "models")
    }
    found = {
        f"{f.package}.{s.name}": {m.name: m.server_streaming for m in s.method} for f in fds.file for s in f.service
    }
    assert found == EXPECTED_RPCS
    assert not any(m.client_streaming for f in fds.file for s in f.service for m in s.method)


def test_every_request_pins_the_model_version():
    fds = gen.descriptor_set()
    for f in fds.file:
        if f.package in CONTROL_PLANE:
            continue
        for s in f.service:
            for m in s.method:
                request = next(msg for msg in f.message_type if f".{f.package}.{msg.name}" == m.input_type)
                names = {fld.name for fld in request.field}
                if "session_id" in names and "model_version" not in names:  # GetSession / DeleteSession
                    continue
                if m.name in ("ListVoices", "ListModelVersions"):  # deployment-wide listings
                    continue
                assert "model_version" in names, f"{m.input_type} has no model_version"
                assert "request_id" in names, f"{m.input_type} has no request_id"


# ----------------------------------------------------------------------------------------------- generated stubs
def test_generated_stubs_are_current():
    problems = gen.stale_files()
    assert not problems, "services/gen is stale; run `python scripts/gen_protos.py`:\n" + "\n".join(problems)


def test_staleness_check_detects_an_edited_proto(tmp_path):
    protos = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", protos)
    tts = protos / "ola" / "tts" / "v1" / "tts.proto"
    tts.write_text(tts.read_text().replace("float speed = 5;", "double speed = 5;"))
    problems = gen.stale_files(ROOT / "services" / "gen", protos)
    assert any(p.startswith("differs: ola/tts/v1/tts_pb2.py") for p in problems), problems


def test_version_stamps_are_ignored():
    text = (ROOT / "services/gen/ola/llm/v1/llm_pb2.py").read_text()
    bumped = text.replace("# Protobuf Python Version: ", "# Protobuf Python Version: 99.")
    assert bumped != text and gen.normalize(bumped) == gen.normalize(text)


def test_generated_files_are_marked_and_importable():
    files = sorted((ROOT / "services" / "gen").rglob("*.py*"))
    files = [f for f in files if "__pycache__" not in f.parts]
    assert files
    for f in files:
        assert f.read_text().startswith(gen.HEADER), f"{f} lacks the generated-file header"
        assert "from ola." not in f.read_text(), f"{f} imports the top-level ola package"
    for name, rpcs in EXPECTED_RPCS.items():
        package, service = name.rsplit(".", 1)
        short = package.split(".")[1]
        grpc_module = importlib.import_module(f"services.gen.{package}.{short}_pb2_grpc")
        assert hasattr(grpc_module, f"add_{service}Servicer_to_server")
        assert hasattr(grpc_module, f"{service}Stub")
        pb2 = importlib.import_module(f"services.gen.{package}.{short}_pb2")
        assert set(pb2.DESCRIPTOR.services_by_name[service].methods_by_name) == set(rpcs)


def test_chat_event_round_trip():
    from services.gen.ola.common.v1 import audio_chunk_pb2, usage_pb2
    from services.gen.ola.omni.v1 import omni_pb2

    events = [
        omni_pb2.ChatResponse(sequence=0, started=omni_pb2.ChatStarted(session_id="s1", model_version="ola-7b@3")),
        omni_pb2.ChatResponse(sequence=1, text_delta=omni_pb2.TextDelta(text="Hi.")),
        omni_pb2.ChatResponse(
            sequence=2,
            audio_chunk=omni_pb2.SpeechChunk(
                sentence_index=0,
                sentence_text="Hi.",
                audio=audio_chunk_pb2.AudioChunk(pcm16=b"\x01\x00", sample_rate_hz=24000, is_last=True),
            ),
        ),
        omni_pb2.ChatResponse(
            sequence=3,
            usage=usage_pb2.Usage(prompt_tokens=usage_pb2.PromptTokens(text=10, image=291, total=301)),
        ),
        omni_pb2.ChatResponse(sequence=4, final=omni_pb2.ChatFinal(text="Hi.", num_sentences=1)),
    ]
    kinds = [omni_pb2.ChatResponse.FromString(e.SerializeToString()).WhichOneof("event") for e in events]
    assert kinds == ["started", "text_delta", "audio_chunk", "usage", "final"]


# -------------------------------------------------------------------------------------------------------- tensors
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int16, torch.uint8]
)
def test_tensor_round_trip(dtype):
    from services.wire import tensor_from_proto, tensor_to_proto

    torch.manual_seed(0)
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    p = tensor_to_proto(t)
    assert list(p.shape) == [3, 5, 7]
    assert len(p.data) == t.numel() * t.element_size()
    back = tensor_from_proto(type(p).FromString(p.SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)


def test_tensor_wire_format_is_little_endian_and_bf16_bit_exact():
    from services.gen.ola.common.v1 import tensor_pb2
    from services.wire import tensor_from_proto, tensor_to_proto

    p = tensor_to_proto(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    assert p.dtype == tensor_pb2.DTYPE_BFLOAT16
    assert p.data == bytes.fromhex("803f00c0")  # 0x3F80, 0xC000 little-endian
    assert tensor_to_proto(torch.tensor([1], dtype=torch.int32)).data == b"\x01\x00\x00\x00"
    # Non-contiguous views and empty or scalar tensors.
    view = torch.arange(12.0).reshape(3, 4)[:, ::2]
    assert torch.equal(tensor_from_proto(tensor_to_proto(view)), view)
    assert tensor_from_proto(tensor_to_proto(torch.zeros(0, 8, dtype=torch.bfloat16))).shape == (0, 8)
    assert tensor_from_proto(tensor_to_proto(torch.tensor(2.5))).item() == 2.5


def test_tensor_from_proto_rejects_bad_input_naming_the_field():
    from services.gen.ola.common.v1 import tensor_pb2
    from services.wire import tensor_from_proto

    with pytest.raises(ValueError, match=r"blocks\[0\]\.embeddings\.data has 10 bytes .* need 24"):
        tensor_from_proto(
            tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 10), "blocks[0].embeddings"
        )
    with pytest.raises(ValueError, match=r"emb\.dtype is DTYPE_UNSPECIFIED"):
        tensor_from_proto(tensor_pb2.Tensor(shape=[1], data=b"\0" * 4), "emb")
    with pytest.raises(ValueError, match="negative dimension"):
        tensor_from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_UINT8, shape=[-1], data=b""))
    with pytest.raises(ValueError, match="cannot be sent"):
        from services.wire import tensor_to_proto

        tensor_to_proto(torch.zeros(2, dtype=torch.complex64))


def test_error_detail_metadata_round_trip():
    from services.gen.ola.common.v1 import errors_pb2
    from services.wire import ERROR_DETAIL_KEY, error_detail, error_metadata, read_error_detail

    detail = error_detail(
        errors_pb2.ERROR_REASON_TOO_MANY_FRAMES, "video: 80 frames, over 64", "video", 80, 64, "frames"
    )
    metadata = error_metadata(detail)
    assert metadata[0][0] == ERROR_DETAIL_KEY and ERROR_DETAIL_KEY.endswith("-bin")
    assert read_error_detail([("other", "x"), *metadata]) == detail
    assert read_error_detail(None) is None
