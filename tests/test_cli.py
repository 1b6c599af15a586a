"""Tests of the command line ``clairstat refine`` on adapter folders peft itself wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

from clairstat._cli import main  # noqa: E402
from clairstat.lora import adapter_factors  # noqa: E402

N_CLIENTS, BAD, BF16 = 6, 5, 2  # client 5 leaves the shared structure; client 2 is bf16
D_IN, D_OUT = 10, 12
MODULES = ("base_model.model.q_proj", "base_model.model.v_proj")
REPO = Path(__file__).resolve().parents[1]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(D_IN, D_OUT, bias=False)
        self.v_proj = torch.nn.Linear(D_IN, D_OUT, bias=False)

    def forward(self, x):
        return self.q_proj(x) + self.v_proj(x)


def _set_factors(model, client, shared, rng):
    """Benign: lora_B = u w_k + 1% noise (one shared column direction u per module);
    the contaminated client's lora_B is random, 3x larger, so its signal is clear."""
    for name, param in model.named_parameters():
        if "lora_A" in name:
            value = rng.standard_normal(tuple(param.shape)) / np.sqrt(D_IN)
        elif "lora_B" in name:
            direction = shared["q" if "q_proj" in name else "v"]
            if client == BAD:
                value = 3.0 * rng.standard_normal((D_OUT, 2)) / np.sqrt(D_OUT)
            else:
                value = (direction @ rng.standard_normal((1, 2))
                         + 0.01 * rng.standard_normal((D_OUT, 2)))
        else:
            continue
        with torch.no_grad():
            param.copy_(torch.as_tensor(value, dtype=param.dtype))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Six adapter folders written by ``save_pretrained`` (r=2, q_proj and v_proj)."""
    root = tmp_path_factory.mktemp("adapters")
    rng = np.random.default_rng(0)
    shared = {m: np.linalg.qr(rng.standard_normal((D_OUT, 1)))[0] for m in "qv"}
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    folders = []
    for client in range(N_CLIENTS):
        torch.manual_seed(client)
        model = peft.get_peft_model(Tiny(), config)
        _set_factors(model, client, shared, rng)
        if client == BF16:
            model = model.to(torch.bfloat16)
        folder = root / f"client{client}"
        model.save_pretrained(str(folder))
        folders.append(folder)
    return folders


def _weights(folder):
    return safetensors_torch.load_file(str(folder / "adapter_model.safetensors"))


def _metadata(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return handle.metadata()


@pytest.fixture(scope="module")
def refined(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    code = main(["refine", "--random-state", "0", "--out", str(out), *map(str, adapters)])
    assert code == 0
    return out


def test_inputs_are_what_peft_writes(adapters):
    """The fixture really has a bf16 client and non-zero updates in peft's key layout."""
    dtypes = {f.name: {t.dtype for t in _weights(f).values()} for f in adapters}
    assert dtypes[f"client{BF16}"] == {torch.bfloat16}
    assert dtypes["client0"] == {torch.float32}
    keys = set(_weights(adapters[0]))
    assert keys == {f"{m}.lora_{w}.weight" for m in MODULES for w in "AB"}
    assert all(np.any(b @ a) for b, a in adapter_factors(_weights(adapters[0])).values())


def test_outputs_keep_keys_shapes_dtypes_and_config(adapters, refined):
    for folder in adapters:
        before, after = _weights(folder), _weights(refined / folder.name)
        assert set(after) == set(before)
        for key, tensor in before.items():
            assert after[key].shape == tensor.shape and after[key].dtype == tensor.dtype
        config = (folder / "adapter_config.json").read_bytes()
        assert (refined / folder.name / "adapter_config.json").read_bytes() == config
        assert _metadata(refined / folder.name) == _metadata(folder) == {"format": "pt"}


def test_refined_adapters_load_into_peft(adapters, refined):
    model = peft.PeftModel.from_pretrained(Tiny(), str(refined / "client0"))
    loaded = peft.get_peft_model_state_dict(model)
    for key, tensor in _weights(refined / "client0").items():
        assert torch.equal(loaded[key], tensor)


def test_report_flags_the_contaminated_client(adapters, refined):
    report = json.loads((refined / "report.json").read_text())
    assert [c["name"] for c in report["clients"]] == [f.name for f in adapters]
    assert report["modules"] == sorted(MODULES)
    flagged = [c["flagged"] for c in report["clients"]]
    assert flagged == [k == BAD for k in range(N_CLIENTS)]
    for client in report["clients"]:
        assert set(client["p_values"]) == set(MODULES)
        assert all(0.0 <= p <= 1.0 for p in client["p_values"].values())


def test_benign_clients_move_the_contaminated_one_does_not(adapters, refined):
    for k, folder in enumerate(adapters):
        before, after = _weights(folder), _weights(refined / folder.name)
        same = all(torch.equal(before[key], after[key]) for key in before)
        assert same == (k == BAD)  # a flagged client gets its own adapter back


def test_joint_mode_reports_one_p_value(adapters, tmp_path):
    code = main(["refine", "--joint", "--random-state", "0", "--out", str(tmp_path),
                 *map(str, adapters)])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(set(c["p_values"]) == {"joint"} for c in report["clients"])


def test_plain_progress_without_tqdm(adapters, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # "import tqdm" now fails
    assert main(["refine", "--random-state", "0", "--out", str(tmp_path),
                 *map(str, adapters)]) == 0
    err = capsys.readouterr().err
    assert "module 1/2: base_model.model.q_proj" in err and "module 2/2" in err


def test_python_dash_m(adapters, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "clairstat", "refine", "--rank", "1",
                          "--random-state", "0", "--out", str(tmp_path / "out"),
                          *map(str, adapters[:5])],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "flagged" in run.stdout
    assert (tmp_path / "out" / "report.json").is_file()
    assert {p.name for p in (tmp_path / "out").iterdir()} == (
        {f.name for f in adapters[:5]} | {"report.json"})


# -- bad inputs: exit status 2 and one line naming the folder ----------------------------
def _copy(folder, target):
    target.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (target / name).write_bytes((folder / name).read_bytes())
    return target


def _run_bad(adapters, bad, tmp_path, capsys):
    capsys.readouterr()
    code = main(["refine", "--out", str(tmp_path / "out"), *map(str, adapters[:3]), str(bad)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written
    return lines[0]


def test_truncated_safetensors(adapters, tmp_path, capsys):
    bad = _copy(adapters[3], tmp_path / "truncated")
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    assert "adapter_model.safetensors" in _run_bad(adapters, bad, tmp_path, capsys)


def test_garbage_safetensors(adapters, tmp_path, capsys):
    bad = _copy(adapters[3], tmp_path / "garbage")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    assert "adapter_model.safetensors" in _run_bad(adapters, bad, tmp_path, capsys)


def test_missing_config(adapters, tmp_path, capsys):
    bad = _copy(adapters[3], tmp_path / "noconfig")
    (bad / "adapter_config.json").unlink()
    assert "adapter_config.json is missing" in _run_bad(adapters, bad, tmp_path, capsys)


def test_corrupt_config(adapters, tmp_path, capsys):
    bad = _copy(adapters[3], tmp_path / "badconfig")
    (bad / "adapter_config.json").write_text('{"r": 2, ')
    assert "adapter_config.json" in _run_bad(adapters, bad, tmp_path, capsys)


def test_missing_folder(adapters, tmp_path, capsys):
    assert "not a folder" in _run_bad(adapters, tmp_path / "absent", tmp_path, capsys)


def test_other_modules(adapters, tmp_path, capsys):
    bad = _copy(adapters[3], tmp_path / "onlyq")
    weights = {k: v for k, v in _weights(bad).items() if "q_proj" in k}
    safetensors_torch.save_file(weights, str(bad / "adapter_model.safetensors"))
    assert "adapts modules" in _run_bad(adapters, bad, tmp_path, capsys)


def test_output_may_not_overwrite_an_input(adapters, capsys):
    code = main(["refine", "--out", str(adapters[0].parent), *map(str, adapters)])
    assert code == 2
    assert "is the input folder itself" in capsys.readouterr().err
