"""An LLM practitioner's review of ``clairstat refine`` and ``clairstat.lora`` on adapter
folders peft wrote: LoRA variants whose update is not ``s B A``, a refined factor its
client's dtype cannot hold, and errors met on ``--scheduler local``'s workers."""

import contextlib
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
from tiny_lora_model import Tiny  # noqa: E402
from clairstat.lora import lora_pairs, refine_adapters  # noqa: E402

D_IN, D_OUT, RANK = 8, 12, 2
REPO = Path(__file__).resolve().parents[1]


def _save(folder, client, dtype=torch.float32, **options):
    """A peft adapter of Tiny: shared factors plus 30% client noise."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=RANK, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                             **options)
    model = peft.get_peft_model(Tiny(D_IN, D_OUT), config)
    shared, own = torch.Generator().manual_seed(1), torch.Generator().manual_seed(client)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(0.1 * torch.randn(param.shape, generator=shared)
                            + 0.03 * torch.randn(param.shape, generator=own))
    model.to(dtype).save_pretrained(str(folder))
    return folder


def _weights(folder):
    return safetensors_torch.load_file(str(folder / "adapter_model.safetensors"))


def _one_line_error(args, capsys):
    capsys.readouterr()
    code = main(["refine", *map(str, args)])
    err = capsys.readouterr().err
    # every line but the progress bars (tqdm's, or the plain ones)
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith(("fits:", "refinement:"))]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("clairstat refine: error: ")
    return lines[0]


def _variant(name):
    try:
        from peft.tuners.lora import config as lora_config
    except ImportError:  # pragma: no cover
        pytest.skip("peft without LoRA variants")
    if not hasattr(lora_config, name):
        pytest.skip(f"this peft has no {name}")
    return getattr(lora_config, name)


def test_kasa_adapters_are_refused_not_refined_as_plain_lora(tmp_path, capsys):
    """KaSA's update is s B diag(lora_diag) A: refined as B A, with lora_diag copied
    unchanged as an untested tensor, every refined adapter's update was wrong (exit 0)."""
    kasa = _variant("KasaConfig")
    folders = [_save(tmp_path / f"c{k}", k, kasa_config=kasa()) for k in range(4)]
    assert any(key.endswith("lora_diag") for key in _weights(folders[0]))
    line = _one_line_error(["--out", tmp_path / "out", *folders], capsys)
    assert str(folders[0]) in line and "KaSA" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="KaSA"):
        lora_pairs(_weights(folders[0]))
    with pytest.raises(ValueError, match="client 0: .*KaSA"):
        refine_adapters([_weights(f) for f in folders], random_state=0)


def test_bdlora_adapters_are_refused_not_refined_as_plain_lora(tmp_path, capsys):
    """BD-LoRA saves a block-diagonal lora_A as its blocks, (r, d_in / nblocks): the
    pairs looked like a (d_out, d_in / nblocks) update and were refined so (exit 0)."""
    bdlora = _variant("BdLoraConfig")
    options = {"use_bdlora": bdlora(target_modules_bd_a=["q_proj"], nblocks=2,
                                    match_strict=False)}
    folders = [_save(tmp_path / f"c{k}", k, **options) for k in range(4)]
    assert _weights(folders[0])["base_model.model.q_proj.lora_A.weight"].shape == (
        RANK, D_IN // 2)
    line = _one_line_error(["--out", tmp_path / "out", *folders], capsys)
    assert str(folders[0]) in line and "BD-LoRA" in line
    assert not (tmp_path / "out").exists()
    configs = [json.loads((f / "adapter_config.json").read_text()) for f in folders]
    with pytest.raises(ValueError, match="client 0: .*BD-LoRA"):
        refine_adapters([_weights(f) for f in folders], configs, random_state=0)


def _small_alpha_fp16(tmp_path):
    """Four fp16 clients; client 0 has lora_alpha 1e-5 (scaling 5e-6) and large factors
    that carry an update like the others': its refined lora_B (the readout splits the
    singular values evenly) is beyond float16's range."""
    folders = [_save(tmp_path / f"c{k}", k, dtype=torch.float16) for k in range(4)]
    config_path = folders[0] / "adapter_config.json"
    config = json.loads(config_path.read_text())
    scale = config["lora_alpha"] / RANK
    config["lora_alpha"] = 1e-5
    config_path.write_text(json.dumps(config))
    weights = _weights(folders[0])
    for key, tensor in weights.items():
        factor = 100.0 if "lora_A" in key else scale / (1e-5 / RANK) / 100.0
        weights[key] = (tensor.double() * factor).half()
        assert torch.isfinite(weights[key]).all()
    safetensors_torch.save_file(weights, str(folders[0] / "adapter_model.safetensors"),
                                metadata={"format": "pt"})
    return folders


@pytest.mark.filterwarnings("ignore:only 4 clients")
@pytest.mark.parametrize("mode", [[], ["--per-module"]])
def test_a_refined_factor_its_dtype_cannot_hold_names_the_folder(tmp_path, capsys, mode):
    """The error said which module, not whose adapter (the documented one line names
    the folder; refine_adapters names the client)."""
    folders = _small_alpha_fp16(tmp_path)
    line = _one_line_error([*mode, "--random-state", "0", "--out", tmp_path / "out",
                            *folders], capsys)
    assert f"error: {folders[0]}: " in line and "float16" in line
    assert not (tmp_path / "out").exists()
    configs = [json.loads((f / "adapter_config.json").read_text()) for f in folders]
    with pytest.raises(ValueError, match="^client 0: .*float16"):
        refine_adapters([_weights(f) for f in folders], configs, random_state=0,
                        joint=not mode)


def test_an_error_on_local_scheduler_workers_is_one_line(tmp_path):
    """An error raised in a fit on --scheduler local's workers also came out as
    distributed's "Compute Failed" log blocks, with their traceback, on stderr. In a
    process of its own: distributed installs its log handler only where the root logger
    has none (pytest's has)."""
    pytest.importorskip("distributed")
    folders = [_save(tmp_path / f"c{k}", k) for k in range(4)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "clairstat", "refine", "--per-module",
                          "--rank", "100", "--scheduler", "local", "--out",
                          str(tmp_path / "out"), *map(str, folders)],
                         capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in run.stderr.splitlines()
             if line.strip() and not line.startswith(("fits:", "refinement:"))]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(lines) == 1 and lines[0].startswith("clairstat refine: error: "), run.stderr
    assert "--rank 100: exceeds what module" in lines[0]  # the option, as without dask
    assert not (tmp_path / "out").exists()


def test_a_cluster_leftover_future_error_is_not_logged_at_exit(caplog):
    """A CI run beside other jobs printed "Future exception was never retrieved" with a
    TimeoutError traceback after the command's one-line error: a future the local
    cluster's shutdown left behind. The cluster's exit silences asyncio's log of such
    leftovers while it closes, and only then (its level is restored)."""
    import asyncio
    import logging

    from clairstat._cli import _Cluster

    def leave_a_future():
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(TimeoutError("Timeout"))
        loop.close()
        del future  # collected unretrieved: asyncio logs it at ERROR

    cluster = _Cluster("local", 1)
    cluster.stack = contextlib.ExitStack()
    cluster.stack.callback(leave_a_future)
    asyncio_log = logging.getLogger("asyncio")
    before = asyncio_log.level
    with caplog.at_level(logging.DEBUG):
        cluster.__exit__(None, None, None)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert asyncio_log.level == before
    with caplog.at_level(logging.DEBUG):  # the control: outside the exit it is logged
        leave_a_future()
    assert [r for r in caplog.records if "never retrieved" in r.getMessage()]
