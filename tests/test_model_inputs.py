"""Model inputs: pickled weights refused without unpickling, corrupt files named in one line
(exit 2 in the CLI, never 'internal'), Graft's own outputs (make-donor and transplant folders)
accepted as models, and remote code listed without running it."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.core.errors import GraftError
from engine.loading.modelfiles import check_gguf, check_safetensors
from engine.loading.models import ModelSpec, load_model, model_card, remote_code_files
from engine.loading.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


class _Evil:
    """Unpickling this creates the marker file: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def folder(tiny_gpt2_folder, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(tiny_gpt2_folder, d)
    return d


def load(path: Path):
    return load_model(ModelSpec.parse(str(path)), "cpu")


def cli_error(capsys, donor: Path) -> str:
    """Run a tool with ``donor`` through the CLI: exit 2 and exactly one 'error:' line."""
    capsys.readouterr()
    rc = main(["compat", "--donor", str(donor), "--target", "tiny-gpt2-a", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and not err[0].startswith("error: internal"), err[0]
    return err[0]


def test_good_folder_loads(folder):
    m = load(folder)
    assert m.spec.kind == "path" and m.label == "model" and m.source == str(folder.resolve())
    assert remote_code_files(m.spec) == []
    assert model_card(m.spec) is None


# --------------------------------------------------------------------------- pickles
def _pickle_only(folder: Path, marker: Path, name: str = "pytorch_model.bin") -> Path:
    """Replace the safetensors weights by a pickle that would create ``marker`` if unpickled."""
    state = build_tiny("tiny-gpt2-a")[0].state_dict()
    (folder / "model.safetensors").unlink()
    target = folder / name
    torch.save({"state_dict": state, "payload": _Evil(marker)}, target)
    return target


@pytest.mark.parametrize(
    "name", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "weights.pt", "model.ckpt"]
)
def test_pickle_only_folder_is_refused_without_unpickling(folder, tmp_path, capsys, name):
    marker = tmp_path / "unpickled.marker"
    target = _pickle_only(folder, marker, name)
    with pytest.raises(GraftError) as exc:
        load(folder)
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(target) in msg and "pickle" in msg and "safetensors" in msg
    assert "use_safetensors=False" in msg and "save_pretrained" in msg  # the conversion command
    line = cli_error(capsys, folder)
    assert name in line and "safetensors" in line
    assert not marker.exists(), "a pickle was unpickled"


def test_safetensors_wins_over_a_pickle_next_to_it(folder, tmp_path):
    """use_safetensors=True: a pytorch_model.bin beside model.safetensors is never opened."""
    marker = tmp_path / "unpickled.marker"
    torch.save({"payload": _Evil(marker)}, folder / "pytorch_model.bin")
    load(folder)
    assert not marker.exists()


def test_pickle_message_has_a_runnable_conversion(folder, tmp_path):
    from engine.loading.modelfiles import convert_command

    cmd = convert_command(folder)
    assert cmd.startswith("python -c ") and str(folder) in cmd and f"{folder}-safetensors" in cmd


# --------------------------------------------------------------------------- corrupt safetensors
def _truncate(folder: Path) -> None:
    p = folder / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)


def _huge_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}" * 100)


def _header_not_json(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)


def _cut_in_header(folder: Path) -> None:
    p = folder / "model.safetensors"
    p.write_bytes(p.read_bytes()[:40])


def _tiny_file(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"abc")


def _offsets_lie(folder: Path) -> None:
    p = folder / "model.safetensors"
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [d * 2 for d in header[name]["shape"]]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _bad_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "gpt2", ')


def _config_not_object(folder: Path) -> None:
    (folder / "config.json").write_text("[1, 2, 3]")


def _no_weights(folder: Path) -> None:
    (folder / "model.safetensors").unlink()


@pytest.mark.parametrize(
    "corrupt,needles",
    [
        (_truncate, ["model.safetensors is truncated", "bytes of tensors"]),
        (_cut_in_header, ["model.safetensors is truncated", "header"]),
        (_tiny_file, ["model.safetensors is not a safetensors file", "3 bytes"]),
        (_garbage, ["model.safetensors is not a safetensors file", "header length of 506.1 PB"]),
        (_huge_header, ["model.safetensors is not a safetensors file", "header length of 4.6 EB"]),
        (_header_not_json, ["model.safetensors is not a safetensors file", "not JSON"]),
        (_offsets_lie, ["model.safetensors is corrupt", "offsets"]),
        (_bad_config, ["config.json is not valid JSON"]),
        (_config_not_object, ["config.json is not a JSON object"]),
        (_no_weights, ["no model weights"]),
    ],
)
def test_corrupt_folder_is_one_named_line(folder, capsys, corrupt, needles):
    corrupt(folder)
    with pytest.raises(GraftError) as exc:
        load(folder)
    msg = str(exc.value)
    assert "\n" not in msg and str(folder) in msg
    for needle in needles:
        assert needle in msg, msg
    line = cli_error(capsys, folder)
    assert needles[0] in line


def test_check_safetensors_accepts_a_good_file(tiny_gpt2_folder):
    check_safetensors(tiny_gpt2_folder / "model.safetensors")


def test_sharded_folder_checks_every_shard(tmp_path, capsys):
    d = tmp_path / "sharded"
    model, tok = build_tiny("tiny-gpt2-a")
    model.save_pretrained(str(d), safe_serialization=True, max_shard_size="200KB")
    tok.save_pretrained(str(d))
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (d / "model.safetensors.index.json").is_file()
    assert load(d).spec.kind == "path"  # intact shards load
    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(GraftError, match=f"{shards[-1].name} is truncated"):
        load(d)
    shards[-1].unlink()
    assert "missing" in cli_error(capsys, d) and shards[-1].name in cli_error(capsys, d)
    (d / "model.safetensors.index.json").write_text("{")
    assert "model.safetensors.index.json is not a valid safetensors index" in cli_error(capsys, d)


def test_broken_tokenizer_is_a_graft_error(folder, capsys):
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(GraftError, match="tokenizer"):
        load(folder)
    assert "tokenizer" in cli_error(capsys, folder)


def test_a_folder_without_tokenizer_files_is_named(folder, capsys):
    """transformers builds an empty tokenizer for such a folder, so every text was zero tokens and
    the run stopped on "the workload produced no tokens"."""
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            f.unlink()
    with pytest.raises(GraftError, match="has no usable tokenizer"):
        load(folder)
    assert "has no usable tokenizer" in cli_error(capsys, folder)


@pytest.mark.parametrize(
    "width", [48, 1 << 20]
)  # 2^20: the model the config asks for would not fit in memory
def test_weights_that_do_not_fit_the_config_name_the_first_tensor(folder, capsys, width):
    cfg = json.loads((folder / "config.json").read_text())
    wte = next(k for k in ("n_embd", "hidden_size") if k in cfg)
    real = cfg[wte]
    cfg[wte] = width
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GraftError) as exc:
        load(folder)
    msg = str(exc.value)
    assert "its weights do not fit its config.json" in msg, msg
    assert f"x {real} in the weights, config.json makes it " in msg and f"x {width})" in msg, msg
    assert "do not fit its config.json" in cli_error(capsys, folder)


def test_a_damaged_builtin_cache_says_how_to_rebuild_it(tiny_gpt2_folder, tmp_path, monkeypatch, capsys):
    """The caches are written atomically, so only damage on disk truncates one: the error names the
    file and says which folder to delete and what rebuilds it."""
    monkeypatch.setenv("GRAFT_MODELS_HOME", str(tmp_path / "models"))
    cache = tmp_path / "models" / "smollm2-135m-instruct"
    shutil.copytree(tiny_gpt2_folder, cache)
    _truncate(cache)
    with pytest.raises(GraftError) as exc:
        load_model(ModelSpec.parse("smollm2-135m-instruct"), "cpu")
    msg = str(exc.value)
    assert "model.safetensors is truncated" in msg and "\n" not in msg, msg
    assert f"delete {cache} and run python -m engine prepare to rebuild it" in msg, msg


# --------------------------------------------------------------------------- GGUF
def _gguf_bytes(tmp_path: Path) -> bytes:
    """A real GGUF: the bundled SmolLM2 file when installed (only its first bytes are read),
    else a small one written with the gguf package."""
    from engine.loading.gguf import smollm2_gguf

    try:
        with open(smollm2_gguf(), "rb") as fh:
            return fh.read(4096)
    except GraftError:
        return _small_gguf(tmp_path).read_bytes()


def _small_gguf(tmp_path: Path) -> Path:
    import gguf

    p = tmp_path / "small-src.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    w.add_name("tiny test model")
    w.add_context_length(64)
    w.add_token_list([f"tok{i}" for i in range(50)])
    w.add_tensor("token_embd.weight", np.zeros((50, 16), dtype=np.float32))
    w.add_tensor("output.weight", np.ones((50, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


@pytest.mark.parametrize("cut", ["early", "late"])
def test_gguf_cut_inside_its_header(tmp_path, capsys, cut):
    data = _gguf_bytes(tmp_path)
    # "late": 40 bytes before the tensor data (2 x 50 x 16 float32, after at most 31 bytes of alignment
    # padding), inside the tensor table, wherever the gguf writer's version puts it
    end = 100 if cut == "early" else len(data) - 2 * 50 * 16 * 4 - 40
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:end])
    with pytest.raises(GraftError, match="cannot read GGUF cut.gguf: cut inside its header"):
        check_gguf(p)
    with pytest.raises(GraftError, match="cut inside its header"):
        load_model(ModelSpec.parse(str(p)), "cpu")
    line = cli_error(capsys, p)
    assert "cut.gguf" in line and "cut inside its header" in line


def test_gguf_truncated_data_and_not_gguf(tmp_path, capsys):
    src = _small_gguf(tmp_path)
    check_gguf(src)  # the intact file passes
    p = tmp_path / "short.gguf"
    p.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(GraftError, match="short.gguf: truncated"):
        check_gguf(p)
    assert "truncated" in cli_error(capsys, p)
    q = tmp_path / "fake.gguf"
    q.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    assert "not a GGUF file" in cli_error(capsys, q)
    r = tmp_path / "v99.gguf"
    r.write_bytes(b"GGUF" + struct.pack("<I", 99) + b"\0" * 64)
    assert "unsupported GGUF version 99" in cli_error(capsys, r)


# --------------------------------------------------------------------------- Graft's own outputs
@pytest.fixture(scope="module")
def donor_dir(tmp_path_factory, sets) -> Path:
    d = tmp_path_factory.mktemp("donor") / "mydonor"
    rc = main(
        [
            "make-donor",
            "--base",
            "tiny-gpt2-a",
            "--concept",
            sets["concept"],
            "--out",
            str(d),
            "--steps",
            "2",
            "--no-replay",
            "--retained",
            sets["retained"],
            "--device",
            "cpu",
            "--quiet",
        ]
    )
    assert rc == 0
    assert (d / "card.json").is_file() and (d / "merged" / "config.json").is_file()
    return d


def _run(tool: str, donor: Path, out: Path, sets, *extra: str) -> dict:
    rc = main(
        [
            tool,
            "--donor",
            str(donor),
            "--target",
            "tiny-gpt2-a",
            "--workload",
            sets["concept"],
            "--max-tokens",
            "64",
            "--device",
            "cpu",
            "--quiet",
            "--json",
            str(out),
            *extra,
        ]
    )
    assert rc == 0
    return json.loads(out.read_text())


def test_make_donor_folder_resolves_to_its_merged_model(donor_dir):
    spec = ModelSpec.parse(str(donor_dir))
    assert (spec.kind, spec.ref, spec.label) == ("path", str(donor_dir / "merged"), "mydonor/merged")
    assert ModelSpec.parse(str(donor_dir / "merged")) == spec
    card = model_card(spec)
    assert card["kind"] == "make-donor" and card["path"] == str(donor_dir)
    assert card["card"] == json.loads((donor_dir / "card.json").read_text())
    assert "tiny-gpt2-a" in card["summary"] and "2 steps" in card["summary"] and "\n" not in card["summary"]
    with pytest.raises(GraftError, match="LoRA adapter of a Graft donor"):
        ModelSpec.parse(str(donor_dir / "adapter"))


def test_make_donor_folder_through_the_tools(donor_dir, sets, tmp_path, capsys):
    merged = str(donor_dir / "merged")
    q = ["--concept", sets["concept"], "--retained", sets["retained"], "--max-new-tokens", "4"]
    env = _run("rank-modules", donor_dir, tmp_path / "rank.json", sets)
    assert env["donor"] == merged and env["result"]["modules"]
    saved = tmp_path / "transplant"
    env = _run("swap", donor_dir, tmp_path / "swap.json", sets, "--k", "2", "--save", str(saved), *q)
    assert env["donor"] == merged and env["result"]["card"]["donor"] == merged
    assert env["result"]["saved_to"] == str(saved) and env["result"]["rollback_bit_exact"]
    env = _run("sweep-k", donor_dir, tmp_path / "sweep.json", sets, "--k-grid", "0,1,2", *q)
    assert env["donor"] == merged and len(env["result"]["points"]) == 3

    # The saved transplant is a model folder too: as a donor, with its surgery card.
    spec = ModelSpec.parse(str(saved))
    assert (spec.kind, spec.ref) == ("path", str(saved))
    card = model_card(spec)
    assert card["kind"] == "transplant" and card["card"]["donor"] == merged
    assert "module-swap of 2 module(s) from merged into tiny-gpt2-a" in card["summary"]
    env = _run("rank-modules", saved, tmp_path / "rank2.json", sets)
    assert env["donor"] == str(saved)


def test_donor_folder_without_its_model_is_named(donor_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(donor_dir, broken)
    shutil.rmtree(broken / "merged")
    with pytest.raises(GraftError, match="Graft donor folder but merged/ holds no model"):
        ModelSpec.parse(str(broken))


def test_peft_adapter_is_not_a_model(tmp_path):
    a = tmp_path / "adapter"
    a.mkdir()
    (a / "adapter_config.json").write_text("{}")
    with pytest.raises(GraftError, match="PEFT adapter"):
        ModelSpec.parse(str(a))


# --------------------------------------------------------------------------- remote code
def test_remote_code_is_listed_never_run(folder, tmp_path):
    marker = tmp_path / "imported.marker"
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilLM",
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTok", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg))
    code = f"open({str(marker)!r}, 'w').close()\nraise SystemExit('this file must never be imported')\n"
    (folder / "modeling_evil.py").write_text(code)
    (folder / "sub").mkdir()
    (folder / "sub" / "helpers.py").write_text(code)
    files = remote_code_files(ModelSpec.parse(str(folder), trust_remote_code=False))
    assert files == [
        "config.json auto_map AutoConfig: configuration_evil.EvilConfig",
        "config.json auto_map AutoModelForCausalLM: modeling_evil.EvilLM",
        "tokenizer_config.json auto_map AutoTokenizer: tokenization_evil.EvilTok",
        "modeling_evil.py",
        "sub/helpers.py",
    ]
    assert not marker.exists()


def test_remote_code_of_builtins_and_missing_hub_models_is_empty(tmp_path):
    assert remote_code_files(ModelSpec.parse("tiny-gpt2-a")) == []
    assert remote_code_files(ModelSpec("hub", "nobody-graft-test/not-cached")) == []
    assert remote_code_files(ModelSpec("gguf", str(tmp_path / "x.gguf"))) == []
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{oops")
    assert remote_code_files(ModelSpec("path", str(bad))) == []
