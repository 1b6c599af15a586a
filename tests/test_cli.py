"""Tests of the command line ``clairstat refine`` on adapter folders peft itself wrote."""

import json
import os
import shutil
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
from clairstat.lora import adapter_factors, refine_adapters  # noqa: E402

N_CLIENTS, BAD, BF16 = 6, 5, 2  # client 5 leaves the shared structure; client 2 is bf16
D_IN, D_OUT = 10, 12
MODULES = ("base_model.model.q_proj", "base_model.model.v_proj")
REPO = Path(__file__).resolve().parents[1]


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
        model = peft.get_peft_model(Tiny(D_IN, D_OUT), config)
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
    model = peft.PeftModel.from_pretrained(Tiny(D_IN, D_OUT), str(refined / "client0"))
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


def _configs(folders):
    return [json.loads((f / "adapter_config.json").read_text()) for f in folders]


@pytest.mark.filterwarnings("ignore:only 6 clients")  # the command reports it, not this
def test_streamed_outputs_equal_refine_adapters_on_whole_adapters(adapters, refined):
    """Two streamed passes over the files give exactly what the in-memory API gives with
    its default (per-module tests, joint refinement)."""
    whole = refine_adapters([_weights(f) for f in adapters], _configs(adapters),
                            random_state=0)
    report = json.loads((refined / "report.json").read_text())
    assert [c["flagged"] for c in report["clients"]] == whole.flagged.tolist()
    assert report["joint"] and report["joint_rank"] == whole.rank_selection.rank
    for k, folder in enumerate(adapters):
        after = _weights(refined / folder.name)
        assert all(torch.equal(after[key], whole.state_dicts[k][key]) for key in after)
        assert report["clients"][k]["p_values"] == {
            name: float(est.p_values_[k]) for name, est in whole.estimators.items()}
        assert report["clients"][k]["adjusted_p_values"] == {
            name: float(est.adjusted_p_values_[k]) for name, est in whole.estimators.items()}


@pytest.mark.filterwarnings("ignore:only 6 clients")
def test_sample_weight_option_is_refine_adapters_sample_weight(adapters, refined, tmp_path):
    """--sample-weight gives what refine_adapters(sample_weight=...) gives, byte for
    byte, and the report records it (a newcomer's review: the command had no way to
    pass the clients' example counts, and its outputs were those of equal weights
    only); the weights change the benign clients' refined adapters (the option is not
    ignored)."""
    weights = [10.0, 10.0, 10.0, 1000.0, 10.0, 10.0]
    assert main(["refine", "--random-state", "0", "--sample-weight",
                 ",".join(f"{w:g}" for w in weights), "--out", str(tmp_path),
                 *map(str, adapters)]) == 0
    whole = refine_adapters([_weights(f) for f in adapters], _configs(adapters),
                            sample_weight=weights, random_state=0)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sample_weight"] == weights
    assert json.loads((refined / "report.json").read_text())["sample_weight"] is None
    assert [c["flagged"] for c in report["clients"]] == whole.flagged.tolist()
    moved = 0
    for k, folder in enumerate(adapters):
        after = _weights(tmp_path / folder.name)
        assert all(torch.equal(after[key], whole.state_dicts[k][key]) for key in after)
        equal = _weights(refined / folder.name)
        moved += any(not torch.equal(after[key], equal[key]) for key in after)
    assert moved >= 1


@pytest.mark.parametrize("bad, said", [
    ("1,2,3", "3 weights for 6 adapter folders"),
    ("1,2,3,4,5,x", "must be numbers separated by commas"),
    ("1,1,1,1,1,-1", "finite and non-negative"),
    ("1,0,0,0,0,0", "--sample-weight 1,0,0,0,0,0: ")])
def test_a_bad_sample_weight_is_one_line_before_anything_is_copied(adapters, tmp_path,
                                                                   capsys, monkeypatch, bad,
                                                                   said):
    copies = []
    monkeypatch.setattr(shutil, "copyfile", lambda *args, **kw: copies.append(args))
    code = main(["refine", "--sample-weight", bad, "--out", str(tmp_path / "out"),
                 *map(str, adapters)])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists() and not copies
    lines = err.strip().splitlines()
    assert len(lines) == 1 and said in lines[0], err


@pytest.mark.filterwarnings("ignore:only 6 clients")
def test_per_module_outputs_equal_refine_adapters_per_module(adapters, tmp_path):
    """--per-module: one pass. Its readouts batch every client (the client-level flags
    come after the last module), refine_adapters only the unflagged ones, so a float64
    product may round differently: the stored values agree to one unit in the last
    place of their dtype."""
    assert main(["refine", "--per-module", "--random-state", "0", "--out", str(tmp_path),
                 *map(str, adapters)]) == 0
    whole = refine_adapters([_weights(f) for f in adapters], _configs(adapters),
                            joint=False, random_state=0)
    report = json.loads((tmp_path / "report.json").read_text())
    assert not report["joint"] and report["joint_rank"] is None
    assert [c["flagged"] for c in report["clients"]] == whole.flagged.tolist()
    for k, folder in enumerate(adapters):
        after = _weights(tmp_path / folder.name)
        for key, tensor in after.items():
            expected = whole.state_dicts[k][key]
            assert tensor.dtype == expected.dtype
            eps = torch.finfo(tensor.dtype).eps  # one ulp of the stored dtype
            torch.testing.assert_close(tensor, expected, rtol=eps, atol=0)


@pytest.fixture(scope="module")
def one_module_poisoned(adapters, tmp_path_factory):
    """The adapters with client 0's q_proj lora_B scaled by 1e3: flagged in that module
    only, too few modules for a client-level flag, so the joint refinement's
    ``flagged_updates`` decides what stands in for it."""
    root = tmp_path_factory.mktemp("poisoned")
    folders = []
    for k, folder in enumerate(adapters):
        target = root / folder.name
        shutil.copytree(folder, target)
        if k == 0:
            weights = _weights(folder)
            key = f"{MODULES[0]}.lora_B.weight"
            weights[key] = 1e3 * weights[key]
            safetensors_torch.save_file(weights, str(target / "adapter_model.safetensors"),
                                        metadata=_metadata(folder))
        folders.append(target)
    return folders


@pytest.mark.filterwarnings("ignore:only 6 clients")
@pytest.mark.parametrize("policy", ["quarantine", "clip"])
def test_flagged_updates_option_is_refine_adapters_option(one_module_poisoned, tmp_path,
                                                          policy):
    """--flagged-updates gives what refine_adapters(flagged_updates=...) gives (without
    it, the default clip), and the two policies give client 0 different q_proj updates
    (so the option reaches the refinement)."""
    folders = one_module_poisoned
    args = [] if policy == "clip" else ["--flagged-updates", policy]  # clip: the default
    assert main(["refine", *args, "--random-state", "0", "--out", str(tmp_path),
                 *map(str, folders)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["flagged_updates"] == policy
    assert report["clients"][0]["module_flagged"] == {MODULES[0]: True, MODULES[1]: False}
    assert not report["clients"][0]["flagged"]
    whole = {name: refine_adapters([_weights(f) for f in folders], _configs(folders),
                                   random_state=0, flagged_updates=name)
             for name in ("quarantine", "clip")}
    for k, folder in enumerate(folders):
        after = _weights(tmp_path / folder.name)
        assert all(torch.equal(after[key], whole[policy].state_dicts[k][key])
                   for key in after)
    key = f"{MODULES[0]}.lora_B.weight"
    assert not torch.equal(whole["clip"].state_dicts[0][key],
                           whole["quarantine"].state_dicts[0][key])


def test_a_whole_adapter_is_never_read(adapters, tmp_path, monkeypatch):
    """Every opening of an input file reads one module's lora_A and lora_B, no more."""
    import safetensors

    opened, real_open = [], safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.handle, self.read = real_open(*args, **kwargs), set()
            opened.append(self.read)

        def __enter__(self):
            self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            self.read.add(key)
            return self.handle.get_tensor(key)

        def __getattr__(self, name):  # metadata, keys, get_slice: the header only
            return getattr(self.handle, name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    assert main(["refine", "--random-state", "0", "--out", str(tmp_path),
                 *map(str, adapters)]) == 0
    reads = [read for read in opened if read]
    # Each module of each client once per pass: the fits, then the joint refinement.
    assert len(reads) == 2 * N_CLIENTS * len(MODULES)
    assert all({key.rsplit(".lora_", 1)[0] for key in read} in ({m} for m in MODULES)
               and len(read) == 2 for read in reads)


@pytest.mark.parametrize("where", ["address", "local", "processes"])
def test_dask_scheduler_gives_the_in_process_outputs(adapters, refined, tmp_path, where):
    """Per-module fits on a Dask cluster (two single-threaded workers) write the same
    bytes and the same report as the in-process run. With worker processes every
    tensor crosses a process boundary: a bf16 client ended the command with a traceback
    (distributed serializes tensors through ``.numpy()``; a review)."""
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "dask"
    if where == "local":  # the workers are threads here: no warning escapes raw
        code, raw = _main_catching_raw_warnings(
            ["refine", "--random-state", "0", "--scheduler", "local", "--workers", "2",
             "--out", str(out), *map(str, adapters)])
        assert raw == []
    else:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1,
                                      processes=where == "processes",
                                      dashboard_address=None) as cluster:
            code = main(["refine", "--random-state", "0", "--scheduler",
                         cluster.scheduler_address, "--out", str(out),
                         *map(str, adapters)])
    assert code == 0
    for folder in adapters:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (out / folder.name / name).read_bytes() == (
                refined / folder.name / name).read_bytes()
    assert json.loads((out / "report.json").read_text()) == json.loads(
        (refined / "report.json").read_text())


@pytest.mark.filterwarnings("ignore:only 6 clients")
def test_per_module_on_dask_worker_processes_gives_the_in_process_outputs(adapters,
                                                                          tmp_path):
    """--per-module on two worker processes: its one pass (fits and readouts on the
    workers, tensors crossing as safetensors bytes) writes the bytes and report of the
    in-process --per-module run (the joint path's test is above)."""
    distributed = pytest.importorskip("distributed")
    args = ["refine", "--per-module", "--random-state", "0"]
    assert main([*args, "--out", str(tmp_path / "here"), *map(str, adapters)]) == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        assert main([*args, "--scheduler", cluster.scheduler_address,
                     "--out", str(tmp_path / "dask"), *map(str, adapters)]) == 0
    for folder in adapters:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            assert (tmp_path / "dask" / folder.name / name).read_bytes() == (
                tmp_path / "here" / folder.name / name).read_bytes()
    assert json.loads((tmp_path / "dask" / "report.json").read_text()) == json.loads(
        (tmp_path / "here" / "report.json").read_text())


def _server(reply):
    """A TCP server on a free local port that sends ``reply`` to every connection and
    then keeps it open, silent: not a Dask scheduler. Returns its address."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held = []

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            if reply:
                conn.sendall(reply)

    threading.Thread(target=serve, daemon=True).start()
    return f"tcp://127.0.0.1:{listener.getsockname()[1]}"


@pytest.mark.parametrize("reply", [b"SSH-2.0-OpenSSH_9.6\r\n", b""],
                         ids=["banner", "silent"])
def test_a_scheduler_address_that_is_no_scheduler_is_one_line(adapters, tmp_path, capsys,
                                                              monkeypatch, reply):
    """--scheduler at a server that is not Dask's: one line and exit 2 within the
    connection timeout. Before, a server that sends a banner (SSH) had its bytes read as
    a frame length (a MemoryError for exabytes, a traceback), and a silent one (an HTTP
    server, the dashboard's port) hung the command past its 30 s timeout (a review)."""
    import time

    pytest.importorskip("distributed")
    from clairstat import _cli

    monkeypatch.setattr(_cli, "CONNECT_TIMEOUT", 2)
    monkeypatch.setattr(_cli, "CONNECT_MARGIN", 2)
    address = _server(reply)
    start = time.monotonic()
    code = main(["refine", "--scheduler", address, "--out", str(tmp_path / "out"),
                 *map(str, adapters)])
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        f"clairstat refine: error: --scheduler {address}: no Dask scheduler"), err
    assert "Traceback" not in err and seconds < 20  # 2 s + 2 s margin, not a hang
    if not reply:
        assert "answered within 4 s" in lines[0]  # the timeout and its margin


def test_workers_without_a_local_scheduler_is_refused(adapters, tmp_path, capsys):
    """--workers sizes --scheduler local's cluster; given without it, it was silently
    ignored (a review): now one line and exit 2."""
    code = main(["refine", "--workers", "3", "--out", str(tmp_path / "out"),
                 *map(str, adapters)])
    assert code == 2 and not (tmp_path / "out").exists()
    assert "--workers 3: applies to --scheduler local only" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--test-level", "0"], ["--test-level", "nan"],
                                 ["--random-state", "-1"], ["--random-state", "4294967296"],
                                 ["--n-jobs", "0"], ["--per-module", "--rank", "-1"],
                                 ["--max-iter", "0"], ["--tol", "-1"]])
def test_a_bad_fit_option_stops_the_run_before_anything_is_copied(adapters, tmp_path, capsys,
                                                                  monkeypatch, bad):
    """The fits' own parameter checks ran only once every adapter had been copied into
    OUT's staging folder (a review): gigabytes copied for a typo. They now run first, in
    one line naming the option."""
    copies = []
    monkeypatch.setattr(shutil, "copyfile", lambda *args, **kw: copies.append(args))
    code = main(["refine", *bad, "--out", str(tmp_path / "out"), *map(str, adapters)])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "out").exists() and not copies
    option = bad[-2]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"clairstat refine: error: {option} "), err


def test_a_report_path_taken_by_a_folder_is_named_as_the_report(adapters, tmp_path, capsys):
    """OUT/report.json as a folder was blamed on the first client (a review)."""
    (tmp_path / "out" / "report.json").mkdir(parents=True)
    code = main(["refine", "--out", str(tmp_path / "out"), *map(str, adapters)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"clairstat refine: error: --out {tmp_path / 'out'}: "
                                        "its report"), err


def test_joint_is_the_default(adapters, refined, tmp_path):
    assert main(["refine", "--joint", "--random-state", "0", "--out", str(tmp_path),
                 *map(str, adapters)]) == 0
    for folder in adapters:
        assert (tmp_path / folder.name / "adapter_model.safetensors").read_bytes() == (
            refined / folder.name / "adapter_model.safetensors").read_bytes()


def test_collections_skip_the_imports_during_the_run_only(adapters, tmp_path, monkeypatch):
    """Every per-module collection runs with the objects of the imports frozen (so it
    does not traverse them), and the command unfreezes them at its end, also on an
    error (it may run inside a longer-lived process, as here); a caller's own freeze is
    left as it was."""
    import gc

    from clairstat import _cli

    frozen, freezes = [], []
    release, freeze = _cli._release_memory, gc.freeze

    def spy_release():
        frozen.append(gc.get_freeze_count())
        release()

    def spy_freeze():
        freezes.append(True)
        freeze()

    monkeypatch.setattr(_cli, "_release_memory", spy_release)
    monkeypatch.setattr(gc, "freeze", spy_freeze)
    assert gc.get_freeze_count() == 0
    assert main(["refine", "--random-state", "0", "--out", str(tmp_path / "a"),
                 *map(str, adapters)]) == 0
    assert len(frozen) >= 2 and min(frozen) > 10_000  # numpy, scipy, torch, clairstat
    assert gc.get_freeze_count() == 0 and len(freezes) == 1
    # an input error after the freeze (a rank no client supports): unfrozen as well
    assert main(["refine", "--rank", "1000", "--out", str(tmp_path / "b"),
                 *map(str, adapters)]) == 2
    assert gc.get_freeze_count() == 0 and len(freezes) == 2
    # the caller froze its objects: the command neither freezes more nor unfreezes them
    freeze()
    try:
        mine = gc.get_freeze_count()
        assert main(["refine", "--random-state", "0", "--out", str(tmp_path / "c"),
                     *map(str, adapters)]) == 0
        # (frozen objects still die by reference count: the count may only fall a little)
        assert 0.99 * mine <= gc.get_freeze_count() <= mine and len(freezes) == 2
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_device_option_runs_the_torch_path_with_the_same_outcome(adapters, refined, tmp_path,
                                                                dtype, monkeypatch):
    """``--device cpu`` runs the torch reduction and readouts (as on a GPU): the same
    flags and the adapters to 1e3 float32 eps of their scale; the reduction really
    receives the device and the dtype (recorded)."""
    from clairstat import _reduced

    seen = []
    original = _reduced.factored_reduction

    def recording(factors, **kwargs):
        seen.append(kwargs)
        return original(factors, **kwargs)

    monkeypatch.setattr(_reduced, "factored_reduction", recording)
    monkeypatch.setattr("clairstat.aggregation.factored_reduction", recording)
    monkeypatch.setattr("clairstat.aggregation._clair.factored_reduction", recording)
    assert main(["refine", "--random-state", "0", "--device", "cpu", "--dtype", dtype,
                 "--out", str(tmp_path), *map(str, adapters)]) == 0
    assert seen and all(kw == {"device": "cpu", "dtype": dtype} for kw in seen)
    report = json.loads((tmp_path / "report.json").read_text())
    want = json.loads((refined / "report.json").read_text())
    assert [c["flagged"] for c in report["clients"]] == [c["flagged"] for c in want["clients"]]
    tol = 1e3 * np.finfo(np.float32).eps
    for folder in adapters:
        got, ref = _weights(tmp_path / folder.name), _weights(refined / folder.name)
        for module in MODULES:
            b_key, a_key = f"{module}.lora_B.weight", f"{module}.lora_A.weight"
            update = (got[b_key].double() @ got[a_key].double()).numpy()
            expected = (ref[b_key].double() @ ref[a_key].double()).numpy()
            # bf16 outputs round at 2^-8: the comparison is at that client's precision
            scale = 2.0 ** -8 if got[b_key].dtype == torch.bfloat16 else tol
            assert np.linalg.norm(update - expected) <= 4 * scale * np.linalg.norm(expected)


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


def test_other_module_shape(adapters, tmp_path, capsys):
    bad = _copy(adapters[3], tmp_path / "wider")
    weights = _weights(bad)
    key = f"{MODULES[0]}.lora_B.weight"
    weights[key] = torch.zeros(D_OUT + 1, 2)
    safetensors_torch.save_file(weights, str(bad / "adapter_model.safetensors"))
    line = _run_bad(adapters, bad, tmp_path, capsys)
    assert f"{MODULES[0]} is (d_out, d_in) = ({D_OUT + 1}, {D_IN})" in line


def _with_value(folder, target, key, value):
    """A copy of an adapter folder whose tensor ``key`` holds ``value`` at [0, 0]."""
    bad = _copy(folder, target)
    weights = _weights(bad)
    weights[key] = weights[key].clone()
    weights[key][0, 0] = value
    safetensors_torch.save_file(weights, str(bad / "adapter_model.safetensors"))
    return bad


def test_non_finite_values_stop_the_run_and_leave_nothing(adapters, tmp_path, capsys):
    """Found while streaming, after the outputs were staged: one line, no OUT left."""
    key = f"{MODULES[1]}.lora_B.weight"
    bad = _with_value(adapters[3], tmp_path / "nan", key, float("nan"))
    capsys.readouterr()
    code = main(["refine", "--out", str(tmp_path / "out"), *map(str, adapters[:3]), str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]  # after the bar
    assert errors == [err.strip().splitlines()[-1]]
    assert str(bad) in errors[0] and f"{key} holds non-finite values" in errors[0]
    assert not (tmp_path / "out").exists()  # the staged outputs were removed


def test_output_may_not_overwrite_an_input(adapters, capsys):
    code = main(["refine", "--out", str(adapters[0].parent), *map(str, adapters)])
    assert code == 2
    assert "is the input folder itself" in capsys.readouterr().err


def test_alpha_that_is_not_a_number(adapters, tmp_path, capsys):
    for value in ("null", '"x"'):
        bad = _copy(adapters[3], tmp_path / f"alpha{len(value)}")
        config = json.loads((bad / "adapter_config.json").read_text())
        (bad / "adapter_config.json").write_text(
            json.dumps(config).replace(f'"lora_alpha": {json.dumps(config["lora_alpha"])}',
                                       f'"lora_alpha": {value}'))
        assert "must be a finite non-zero number" in _run_bad(adapters, bad, tmp_path, capsys)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "int8"])
def test_factors_that_are_not_floats(adapters, tmp_path, capsys, dtype):
    bad = _copy(adapters[3], tmp_path / dtype)
    weights = {k: v.to(getattr(torch, dtype)) for k, v in _weights(bad).items()}
    safetensors_torch.save_file(weights, str(bad / "adapter_model.safetensors"))
    assert "F16, BF16, F32 or F64" in _run_bad(adapters, bad, tmp_path, capsys)


def test_lora_bias_is_refused(adapters, tmp_path, capsys):
    bad = _copy(adapters[3], tmp_path / "bias")
    weights = _weights(bad)
    weights[f"{MODULES[0]}.lora_B.bias"] = torch.full((D_OUT,), 1000.0)
    safetensors_torch.save_file(weights, str(bad / "adapter_model.safetensors"))
    assert "lora_bias" in _run_bad(adapters, bad, tmp_path, capsys)


def test_what_peft_writes_beside_lora_factors_is_named(adapters, tmp_path, capsys):
    """Other adapter kinds, a pickle-only folder, a named adapter's parent folder and
    LoRA on a convolution are refused with what is wrong (a review found messages that
    did not say it)."""
    ia3 = _copy(adapters[3], tmp_path / "ia3")
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    assert "peft_type IA3" in _run_bad(adapters, ia3, tmp_path, capsys)
    pickled = _copy(adapters[3], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert "pickle" in _run_bad(adapters, pickled, tmp_path, capsys)
    parent = tmp_path / "parent"
    parent.mkdir()
    _copy(adapters[3], parent / "other")
    assert str(parent / "other") in _run_bad(adapters, parent, tmp_path, capsys)
    conv = _copy(adapters[3], tmp_path / "conv")
    weights = _weights(conv)
    weights[f"{MODULES[0]}.lora_A.weight"] = torch.zeros((2, D_IN, 1, 1))
    safetensors_torch.save_file(weights, str(conv / "adapter_model.safetensors"))
    assert "convolution" in _run_bad(adapters, conv, tmp_path, capsys)


def test_untested_tensors_and_other_base_models_are_reported(adapters, tmp_path, capsys):
    """A whole module saved beside the LoRA pairs (peft's modules_to_save: here a head
    poisoned 50-fold) is copied unchanged, as before, but no longer silently: a warning
    names it and report.json lists it under the client's "untested"; adapters whose
    configs name different base models draw a warning, and so do adapters that name
    none beside ones that do (a review: that case was silent)."""
    inputs = [_copy(folder, tmp_path / folder.name) for folder in adapters]
    for k, folder in enumerate(inputs):
        weights = _weights(folder)
        weights["base_model.model.head.weight"] = torch.ones((3, D_OUT)) * (50.0 if k == 1
                                                                           else 1.0)
        safetensors_torch.save_file(weights, str(folder / "adapter_model.safetensors"))
    config = json.loads((inputs[2] / "adapter_config.json").read_text())
    for k, base in ((2, "org/base-a"), (3, "org/base-b")):
        (inputs[k] / "adapter_config.json").write_text(
            json.dumps({**config, "base_model_name_or_path": base}))
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["refine", "--random-state", "0", "--out", str(out), *map(str, inputs)]) == 0
    err = capsys.readouterr().err
    assert "not LoRA factors" in err and "base_model.model.head.weight" in err
    assert "3 base models" in err and "org/base-a" in err and "none named" in err
    report = json.loads((out / "report.json").read_text())
    assert all(entry["untested"] == ["base_model.model.head.weight"]
               for entry in report["clients"])
    head = _weights(out / inputs[1].name)["base_model.model.head.weight"]
    assert torch.equal(head, torch.full((3, D_OUT), 50.0))  # copied, as the report says


def test_inputs_of_one_name_are_told_how_to_go_on(adapters, tmp_path, capsys):
    """run0/checkpoint-500 and run1/checkpoint-500 (a Trainer's layout) share the output
    name; the error said so but not what to do (a review): it suggests symbolic links
    with distinct names, and those work."""
    for k in range(4):
        (tmp_path / f"run{k}").mkdir()
    inputs = [_copy(folder, tmp_path / f"run{k}" / "checkpoint-500")
              for k, folder in enumerate(adapters[:4])]
    capsys.readouterr()
    assert main(["refine", "--out", str(tmp_path / "out"), *map(str, inputs)]) == 2
    err = capsys.readouterr().err
    assert "same name 'checkpoint-500'" in err and "symbolic links" in err
    links = []
    for k, folder in enumerate(inputs):
        links.append(tmp_path / f"client{k}")
        links[-1].symlink_to(folder, target_is_directory=True)
    assert main(["refine", "--random-state", "0", "--out", str(tmp_path / "out"),
                 *map(str, links)]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "client0", "client1", "client2", "client3", "report.json"]


def test_an_adapter_initialised_from_the_base_weights_is_named(adapters, tmp_path, capsys):
    """A PiSSA adapter's factors hold the base weights' leading components: the command
    names the folder in a warning (it refined them silently, a review)."""
    inputs = [_copy(folder, tmp_path / folder.name) for folder in adapters]
    config = json.loads((inputs[1] / "adapter_config.json").read_text())
    (inputs[1] / "adapter_config.json").write_text(
        json.dumps({**config, "init_lora_weights": "pissa"}))
    capsys.readouterr()
    assert main(["refine", "--random-state", "0", "--out", str(tmp_path / "out"),
                 *map(str, inputs)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"{inputs[1].name} (pissa): initialised from the base weights" in err


def test_an_untested_tensor_with_non_finite_values_is_refused(adapters, tmp_path, capsys):
    """An inf in one client's modules_to_save head was copied to its output with exit
    status 0 (a review): every tensor is checked, the untested ones in the first pass,
    and the folder and key are named before anything is written."""
    inputs = [_copy(folder, tmp_path / folder.name) for folder in adapters]
    for k, folder in enumerate(inputs):
        weights = _weights(folder)
        head = torch.ones((3, D_OUT))
        if k == 4:
            head[1, 2] = float("inf")
        weights["base_model.model.head.weight"] = head
        safetensors_torch.save_file(weights, str(folder / "adapter_model.safetensors"))
    message = _run_bad(inputs, inputs[4], tmp_path, capsys)
    assert "base_model.model.head.weight (copied untested" in message
    assert "non-finite" in message


@pytest.mark.filterwarnings("ignore:only 6 clients")
@pytest.mark.parametrize("rule", [None, "one-standard-error"])
def test_rank_rule_option_is_refine_adapters_option(adapters, tmp_path, rule):
    """--rank-rule gives the joint rank and the adapters refine_adapters(rank_rule=...)
    gives (without it, the default smallest-error rule), and the report names it."""
    args = [] if rule is None else ["--rank-rule", rule]
    assert main(["refine", *args, "--random-state", "0", "--out", str(tmp_path),
                 *map(str, adapters)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rank_rule"] == (rule or "smallest-error")
    whole = refine_adapters([_weights(f) for f in adapters], _configs(adapters),
                            random_state=0, rank_rule=rule)
    assert whole.rank_selection.rule == report["rank_rule"]
    assert report["joint_rank"] == whole.rank_selection.rank
    for k, folder in enumerate(adapters):
        after = _weights(tmp_path / folder.name)
        assert all(torch.equal(after[key], whole.state_dicts[k][key]) for key in after)



@pytest.mark.filterwarnings("ignore:only 6 clients")
@pytest.mark.parametrize("options", [["--rank", "1"], ["--per-module"]])
def test_report_names_no_rank_rule_where_nothing_was_cross_validated(adapters, tmp_path,
                                                                      options):
    """A rank given, or no joint refinement: no rule chose a rank, and the report says
    so (it named the default rule there before)."""
    assert main(["refine", *options, "--random-state", "0", "--out", str(tmp_path),
                 *map(str, adapters)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rank_rule"] is None
    assert report["joint_rank"] == (1 if options[0] == "--rank" else None)


@pytest.mark.filterwarnings("ignore:only 6 clients")
@pytest.mark.parametrize("rule", [None, "one-standard-error"])
def test_rank_rule_option_reaches_the_cross_validation(adapters, tmp_path, monkeypatch,
                                                       rule):
    """The rule the CLI's cross-validation runs with is --rank-rule's (on these adapters
    both rules pick the same rank, so comparing ranks or adapters with refine_adapters
    passes even when the option is dropped on the way: a review)."""
    from clairstat.aggregation import _rank

    seen, real = [], _rank.cross_validated_rank

    def spy(*args, rule=_rank.DEFAULT_RANK_RULE, **kwargs):
        seen.append(rule)
        return real(*args, rule=rule, **kwargs)

    monkeypatch.setattr(_rank, "cross_validated_rank", spy)
    args = [] if rule is None else ["--rank-rule", rule]
    assert main(["refine", *args, "--random-state", "0", "--out", str(tmp_path),
                 *map(str, adapters)]) == 0
    assert seen == [rule or "smallest-error"]


def test_usage_errors_are_one_line(adapters, tmp_path, capsys, monkeypatch):
    """OUT a file, one client, an unusable device, a folder given twice (through a link),
    --flagged-updates with --per-module (it would be ignored), '.' as a folder (named by
    its resolved path)."""
    (tmp_path / "afile").write_text("x")
    link = tmp_path / "again"
    link.symlink_to(adapters[0])
    cases = [(["--out", str(tmp_path / "afile"), *map(str, adapters[:3])], "not a folder"),
             (["--out", str(tmp_path / "o"), str(adapters[0])], "at least two"),
             (["--device", "meta", "--out", str(tmp_path / "o"), *map(str, adapters[:3])],
              "cpu or cuda"),
             (["--out", str(tmp_path / "o"), *map(str, adapters[:3]), str(link)],
              "given more than once"),
             (["--per-module", "--flagged-updates", "clip", "--out", str(tmp_path / "o"),
               *map(str, adapters[:3])], "applies to the joint refinement"),
             (["--per-module", "--rank-rule", "smallest-error", "--out",
               str(tmp_path / "o"), *map(str, adapters[:3])], "applies to the joint"),
             (["--rank", "1", "--rank-rule", "smallest-error", "--out",
               str(tmp_path / "o"), *map(str, adapters[:3])], "--rank fixes")]
    for args, message in cases:
        capsys.readouterr()
        assert main(["refine", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()
    monkeypatch.chdir(adapters[0])
    others = [os.path.relpath(folder, adapters[0]) for folder in adapters[1:3]]
    assert main(["refine", "--out", str(tmp_path / "dot"), ".", *others]) == 0
    assert (tmp_path / "dot" / adapters[0].name).is_dir()


def test_an_output_that_cannot_be_written_is_refused_first(adapters, tmp_path, capsys):
    """An existing OUT whose OUT/<name>/adapter_model.safetensors is a folder: refused
    before the fits, OUT left as it was (publishing would fail half-way otherwise)."""
    out = tmp_path / "out"
    (out / adapters[1].name / "adapter_model.safetensors").mkdir(parents=True)
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["refine", "--out", str(out), *map(str, adapters[:3])]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "exists and is a folder" in err
    assert sorted(p.name for p in out.iterdir()) == sorted([adapters[1].name, "keep.txt"])


# -- outputs that lead elsewhere, unusable OUT, leftovers (a review) ----------------------
def _one_line_error(args, capsys):
    """main(args): exit 2 and one line on stderr, which it returns."""
    capsys.readouterr()
    code = main(["refine", *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("clairstat refine: error: ")
    return lines[0]


def _tree(path):
    """Every path under ``path`` (links not followed) with its bytes, for 'unchanged'."""
    return {str(p.relative_to(path)): (os.readlink(p) if p.is_symlink() else
                                       p.read_bytes() if p.is_file() else None)
            for p in sorted(path.rglob("*"))}


def test_out_links_to_an_input_outside_or_nowhere_are_refused(adapters, tmp_path, capsys):
    """OUT/<name> a link to another client's input (which the run overwrote), to a
    folder outside OUT, or dangling: refused before anything is written."""
    (tmp_path / "in").mkdir()
    inputs = [_copy(folder, tmp_path / "in" / folder.name) for folder in adapters[:3]]
    before = _tree(tmp_path / "in")
    (tmp_path / "elsewhere").mkdir()
    cases = {"to_input": (inputs[1], "leads into the input folder"),
             "outside": (tmp_path / "elsewhere", "outside --out"),
             "dangling": (tmp_path / "absent", "does not exist")}
    for case, (target, message) in cases.items():
        out = tmp_path / case
        out.mkdir()
        (out / inputs[0].name).symlink_to(target)
        line = _one_line_error(["--out", str(out), *map(str, inputs)], capsys)
        assert message in line and str(inputs[0]) in line
        assert [p.name for p in out.iterdir()] == [inputs[0].name]
    assert _tree(tmp_path / "in") == before
    assert not any((tmp_path / "elsewhere").iterdir())


def test_hard_links_of_the_inputs_are_refused_and_publishing_replaces(adapters, tmp_path,
                                                                      capsys):
    """OUT made with ``cp -al`` of the inputs: refused up front (it crashed on the
    config copy, OUT half-written). An output path that holds a hard link to some other
    file is replaced, not written through: that file keeps its bytes."""
    (tmp_path / "in").mkdir()
    inputs = [_copy(folder, tmp_path / "in" / folder.name) for folder in adapters[:4]]
    out = tmp_path / "out"
    for folder in inputs:
        (out / folder.name).mkdir(parents=True)
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            os.link(folder / name, out / folder.name / name)
    before = _tree(tmp_path / "in")
    line = _one_line_error(["--out", str(out), *map(str, inputs)], capsys)
    assert "hard or symbolic link" in line
    assert _tree(tmp_path / "in") == before
    keep = tmp_path / "keep.bin"
    keep.write_bytes(b"not an adapter")
    for folder in inputs:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            (out / folder.name / name).unlink()
        os.link(keep, out / folder.name / "adapter_model.safetensors")
    assert main(["refine", "--random-state", "0", "--out", str(out),
                 *map(str, inputs)]) == 0
    assert keep.read_bytes() == b"not an adapter" and os.stat(keep).st_nlink == 1
    assert _tree(tmp_path / "in") == before
    assert set(_weights(out / inputs[0].name)) == set(_weights(inputs[0]))


def test_unusable_out_is_one_line_and_leaves_nothing(adapters, tmp_path, capsys):
    """OUT under a file, a dangling link, uncreatable (/proc), or empty: one line, exit
    2 (a traceback and exit 1 before; '' wrote into the current folder)."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    cases = [(tmp_path / "afile" / "x", "not a folder"),
             (tmp_path / "dangling", "does not exist"), ("", "the path is empty")]
    if Path("/proc/self").exists():
        cases.append((Path("/proc/clairstat-test-out"), "cannot be created"))
    for out, message in cases:
        line = _one_line_error(["--out", str(out), *map(str, adapters[:3])], capsys)
        assert message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dangling"]


def test_a_failed_run_removes_the_parents_it_created(adapters, tmp_path, capsys):
    """--out deep/a/b/c and an input found bad while streaming: deep/ is gone too."""
    bad = _with_value(adapters[3], tmp_path / "nan", f"{MODULES[1]}.lora_A.weight",
                      float("inf"))
    capsys.readouterr()
    assert main(["refine", "--out", str(tmp_path / "deep" / "a" / "b" / "c"),
                 *map(str, adapters[:3]), str(bad)]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()


def test_out_inside_an_input_folder_is_refused(adapters, tmp_path, capsys):
    inputs = [_copy(folder, tmp_path / folder.name) for folder in adapters[:3]]
    before = _tree(inputs[1])
    for out, message in ((inputs[1], "is the input folder"),
                         (inputs[1] / "refined", "is inside the input folder")):
        line = _one_line_error(["--out", str(out), *map(str, inputs)], capsys)
        assert message in line and str(inputs[1]) in line
    assert _tree(inputs[1]) == before


def test_stale_client_folders_in_out_are_named(adapters, tmp_path, capsys):
    """An earlier run's client folders in OUT, not among this run's: a warning names
    them (report.json does not list them); other folders are not adapters."""
    out = tmp_path / "out"
    assert main(["refine", "--random-state", "0", "--out", str(out),
                 *map(str, adapters[:4])]) == 0
    (out / "notes").mkdir()
    capsys.readouterr()
    assert main(["refine", "--random-state", "0", "--out", str(out),
                 *map(str, adapters[:3])]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines()
              if "of no client of this run" in line]
    assert len(warned) == 1 and f"({adapters[3].name})" in warned[0]
    report = json.loads((out / "report.json").read_text())
    assert [c["name"] for c in report["clients"]] == [f.name for f in adapters[:3]]


# -- alphas and values the float64 fits cannot take (a review) ----------------------------
def _with_config(folder, target, **fields):
    bad = _copy(folder, target)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return bad


def test_alpha_zero_or_infinite_is_refused(adapters, tmp_path, capsys):
    """lora_alpha 0 wrote inf into the refined lora_B with exit 0; an infinite alpha and
    alpha_pattern values are refused the same way; the Python API names the client. A
    negative alpha is peft's (a negative scaling) and runs."""
    cases = {"zero": {"lora_alpha": 0}, "infinite": {"lora_alpha": float("inf")},
             "pattern": {"alpha_pattern": {"q_proj": 0}}}
    for name, fields in cases.items():
        bad = _with_config(adapters[3], tmp_path / name, **fields)
        assert "must be a finite non-zero number" in _run_bad(adapters, bad, tmp_path,
                                                              capsys)
    configs = _configs(adapters)
    configs[3] = {**configs[3], "lora_alpha": 0}
    with pytest.raises(ValueError, match="client 3: lora_alpha .* non-zero number, got 0"):
        refine_adapters([_weights(f) for f in adapters], configs, random_state=0)
    configs[3] = {**configs[3], "lora_alpha": -4}
    refined = refine_adapters([_weights(f) for f in adapters], configs, random_state=0)
    for tensor in refined.state_dicts[3].values():
        assert np.all(np.isfinite(np.asarray(tensor, dtype=float)))


def test_updates_too_large_for_float64_are_refused_naming_the_folder(adapters, tmp_path,
                                                                     capsys):
    """lora_B times 1e200 in float64, or lora_alpha 1e308: the fits' squares overflowed
    and the run stopped on an infinite noise scale naming no folder."""
    huge = _copy(adapters[3], tmp_path / "huge")
    weights = {k: v.double() * (1e200 if "lora_B" in k else 1.0)
               for k, v in _weights(huge).items()}
    safetensors_torch.save_file(weights, str(huge / "adapter_model.safetensors"))
    alpha = _with_config(adapters[3], tmp_path / "alpha", lora_alpha=1e308)
    for bad in (huge, alpha):
        capsys.readouterr()
        assert main(["refine", "--out", str(tmp_path / "out"), *map(str, adapters[:3]),
                     str(bad)]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert errors == [err.strip().splitlines()[-1]] and "Traceback" not in err
        assert str(bad) in errors[0] and "too large for float64" in errors[0]
        assert not (tmp_path / "out").exists()
    inputs = [*adapters[:3], huge]  # the Python API: a ValueError naming the client
    with pytest.raises(ValueError, match="client 3: .*too large for float64"):
        refine_adapters([_weights(f) for f in inputs], _configs(inputs), random_state=0)


# -- warnings: all in the command's format, clients by folder (a review) -----------------
def _main_catching_raw_warnings(args):
    """main(args) with Python's own warning display recorded (what escapes the
    command's formatter)."""
    import warnings

    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        code = main(args)
    return code, [str(w.message) for w in raw]


def test_joint_refinement_and_numpy_warnings_are_formatted(adapters, tmp_path, capsys):
    """The joint refinement's rank warning (second pass) and numpy's overflow on tiny
    float64 values came out in Python's format."""
    capsys.readouterr()
    code, raw = _main_catching_raw_warnings(
        ["refine", "--rank", "3", "--random-state", "0", "--out", str(tmp_path / "a"),
         *map(str, adapters[:3]), str(adapters[BAD])])
    assert code == 0 and raw == []
    err = capsys.readouterr().err
    assert "clairstat refine: warning: joint rank 3 exceeds" in err
    tiny = _copy(adapters[3], tmp_path / "tiny")
    weights = {k: v.double() * (1e-200 if "lora_B" in k else 1.0)
               for k, v in _weights(tiny).items()}
    safetensors_torch.save_file(weights, str(tiny / "adapter_model.safetensors"))
    code, raw = _main_catching_raw_warnings(
        ["refine", "--random-state", "0", "--out", str(tmp_path / "b"),
         *map(str, adapters[:3]), str(tiny)])
    assert code == 0 and raw == []
    err = capsys.readouterr().err
    assert "warning: all 2 modules: RuntimeWarning: overflow" in err
    assert all(line.startswith("clairstat refine: warning: ")
               for line in err.splitlines() if "arning" in line)


def test_warnings_name_clients_by_folder_and_the_modules(adapters, tmp_path, capsys,
                                                         monkeypatch):
    """A fit's warning that names clients by position (``Clients [1, 3]``) names their
    folders, once, with the modules it came from."""
    import warnings

    import clairstat.aggregation as aggregation

    original = aggregation.clair_modules

    def warning_fit(factor_lists, *args, **kwargs):
        warnings.warn("Clients [1, 3] are kept; client 2 too.", UserWarning)
        if "v_proj" in next(iter(factor_lists)):
            warnings.warn("only in v_proj", UserWarning)
        return original(factor_lists, *args, **kwargs)

    monkeypatch.setattr(aggregation, "clair_modules", warning_fit)
    capsys.readouterr()
    code, raw = _main_catching_raw_warnings(
        ["refine", "--random-state", "0", "--out", str(tmp_path), *map(str, adapters)])
    assert code == 0 and raw == []
    err = capsys.readouterr().err.splitlines()
    names = [f.name for f in adapters]
    assert (f"clairstat refine: warning: all 2 modules: Clients [{names[1]!r}, "
            f"{names[3]!r}] are kept; client {names[2]!r} too.") in err
    assert f"clairstat refine: warning: {MODULES[1]}: only in v_proj" in err


def test_recorded_warnings_are_per_thread_and_restore_the_hook():
    """Threads that start and stop recording in any order each get their own warnings,
    none escapes, and Python's display is back afterwards (catch_warnings per fit,
    process-wide, printed a fit's warnings raw under --scheduler local)."""
    import threading
    import warnings

    from clairstat._cli import recorded_warnings

    barrier, lists = threading.Barrier(2), {}

    def fit(k):
        with recorded_warnings() as caught:
            barrier.wait()
            warnings.warn(f"first {k}")
            barrier.wait()  # thread 0 stops recording; thread 1 still warns
            if k == 1:
                barrier.wait()
                warnings.warn("second 1")
        if k == 0:
            barrier.wait()
        lists[k] = [message for _, message in caught]

    shown, filters = warnings.showwarning, warnings.filters
    with warnings.catch_warnings(record=True) as raw:
        threads = [threading.Thread(target=fit, args=(k,)) for k in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert raw == [] and lists == {0: ["first 0"], 1: ["first 1", "second 1"]}
    assert warnings.showwarning is shown and warnings.filters is filters


# -- messages (a review) ------------------------------------------------------------------
def test_module_mismatch_names_the_difference_only(tmp_path, capsys):
    """Clients adapting other modules: the missing and extra ones (the first few and a
    count), not both full lists."""
    from clairstat.lora import module_difference

    reference = [f"layers.{i}.q_proj" for i in range(200)]
    text = module_difference(reference[1:] + ["layers.0.k_proj"], reference)
    assert text == "lacks 1 (layers.0.q_proj); adds 1 (layers.0.k_proj)"
    text = module_difference(reference[:10], reference)
    assert text.startswith("lacks 190 (layers.10.q_proj, ") and "(190 in all)" in text
    assert len(text) < 120


def test_other_modules_line_is_short(adapters, tmp_path, capsys):
    bad = _copy(adapters[3], tmp_path / "onlyv")
    weights = {k: v for k, v in _weights(bad).items() if "v_proj" in k}
    safetensors_torch.save_file(weights, str(bad / "adapter_model.safetensors"))
    line = _run_bad(adapters, bad, tmp_path, capsys)
    assert f"lacks 1 ({MODULES[0]})" in line and MODULES[1] not in line


def test_folder_name_that_is_not_utf8(adapters, tmp_path, capsys):
    """safetensors opens files by a UTF-8 path: such a folder is named as the path that
    cannot be opened (not as an unreadable file), its bytes escaped."""
    try:
        bad = _copy(adapters[3], tmp_path / os.fsdecode(b"client\xff"))
    except (OSError, UnicodeError):
        pytest.skip("this file system takes no such name")
    line = _one_line_error(["--out", str(tmp_path / "out"), *map(str, adapters[:3]),
                            str(bad)], capsys)
    assert "client\\xff: its path is not valid UTF-8" in line
    assert not (tmp_path / "out").exists()


def test_a_second_review_of_the_command(adapters, tmp_path, capsys, monkeypatch):
    """A negative alpha no longer hides an overflowing update from the size check; -W
    error does not kill the run (its warnings stay lines); a message naming clients is
    substituted once (a folder called "client 0" is not renamed again); inputs that lie
    inside OUT are not stale outputs."""
    from clairstat._cli import _named, _stale_outputs
    from clairstat.lora import check_update_size

    with pytest.raises(ValueError, match="too large"):
        check_update_size("m", np.full((4, 2), 1e200), np.ones((2, 4)), -2.0)
    assert _named("Clients [0, 1] are kept; client 2 is not", ["client 1", "client 0", "s"]) \
        == "Clients ['client 1', 'client 0'] are kept; client 's' is not"
    out = tmp_path / "out"
    (out / "c0").mkdir(parents=True)
    (out / "c0" / "adapter_config.json").write_text("{}")
    assert _stale_outputs(out, set(), {(out / "c0").resolve()}) == []
    assert _stale_outputs(out, set()) == ["c0"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capsys.readouterr()
        code = main(["refine", "--rank", "3", "--random-state", "0", "--out",
                     str(tmp_path / "w"), *map(str, adapters[:3]), str(adapters[BAD])])
    assert code == 0 and "clairstat refine: warning:" in capsys.readouterr().err


def _replace_while_publishing(monkeypatch, replace):
    """``os.replace`` is ``replace`` in clairstat._cli while it publishes, and only then."""
    from clairstat import _cli

    real_publish, real_replace = _cli._publish, os.replace

    def publish(*args):
        monkeypatch.setattr(_cli.os, "replace", replace)
        try:
            return real_publish(*args)
        finally:
            monkeypatch.setattr(_cli.os, "replace", real_replace)

    monkeypatch.setattr(_cli, "_publish", publish)


@pytest.mark.filterwarnings("ignore:only")
@pytest.mark.parametrize("undo_fails", [False, True])
def test_a_rename_failing_while_publishing_leaves_out_as_it_was(adapters, tmp_path, capsys,
                                                                monkeypatch, undo_fails):
    """OUT holds a first run's outputs and a file of the user's; a second run on more
    clients (other refined values, two new folders) fails at its last rename (the
    report): every rename it made is undone, and OUT is byte for byte as it was. When
    the undo fails too, the message says that OUT may be incomplete."""
    out = tmp_path / "out"
    assert main(["refine", "--random-state", "0", "--out", str(out),
                 *map(str, adapters[:4])]) == 0
    (out / "keep.txt").write_text("mine")
    before = _tree(out)
    real_replace = os.replace
    made, failed = [], []

    def failing(source, destination):
        # the new report's placement fails (not the old one's return when undoing);
        # with undo_fails, so does every rename after it
        placing = (Path(destination) == out / "report.json"
                   and "staging-replaced-" not in str(source))
        if placing or (undo_fails and failed):
            failed.append(destination)
            raise OSError(5, "injected I/O error")
        made.append(destination)
        return real_replace(source, destination)

    _replace_while_publishing(monkeypatch, failing)
    capsys.readouterr()
    assert main(["refine", "--random-state", "0", "--out", str(out),
                 *map(str, adapters)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]  # after the progress bars
    assert line.startswith("clairstat refine: error: ") and "injected I/O error" in line
    if undo_fails:  # nothing replaced is deleted: the folder the message names has it
        assert "OUT may be incomplete" in line
        kept = Path(line.split("are kept in ")[1])
        assert kept.parent == out and kept.is_dir()
        assert sorted(p.name for p in kept.rglob("*") if p.is_file()) == \
            sorted(["adapter_config.json", "adapter_model.safetensors"] * 4 + ["report.json"])
        return
    assert "OUT is as it was before the run" in line
    assert len(made) > 10  # the renames made before the failure: folders and files
    assert _tree(out) == before


@pytest.mark.filterwarnings("ignore:only")
def test_an_interrupt_while_publishing_undoes_the_renames(adapters, tmp_path, capsys,
                                                          monkeypatch):
    """Ctrl-C (or SIGTERM, which main turns into one) between moving an old output aside
    and moving the new one in: the renames are undone before the interrupt goes on, so
    no output path is left empty and OUT is as it was. A client folder named like the
    aside folder of an earlier version (``.replaced``) is an ordinary client."""
    (tmp_path / "in").mkdir()
    inputs = [_copy(folder, tmp_path / "in" / name)
              for folder, name in zip(adapters[:4], ["a", ".replaced", "c", "d"])]
    out = tmp_path / "out"
    assert main(["refine", "--random-state", "0", "--out", str(out),
                 *map(str, inputs[:3])]) == 0
    before = _tree(out)
    real_replace = os.replace
    calls = []

    def interrupted(source, destination):
        calls.append(destination)
        if len(calls) == 6:  # a new file's move, after its old one went aside
            raise KeyboardInterrupt
        return real_replace(source, destination)

    _replace_while_publishing(monkeypatch, interrupted)
    capsys.readouterr()
    # one line and the status of a process ended by SIGINT, no traceback
    assert main(["refine", "--random-state", "0", "--out", str(out), *map(str, inputs)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "clairstat refine: interrupted by SIGINT"
    assert _tree(out) == before
    monkeypatch.undo()
    assert main(["refine", "--random-state", "0", "--out", str(out), *map(str, inputs)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".replaced", "a", "c", "d",
                                                     "report.json"]
    assert set(_weights(out / ".replaced")) == set(_weights(inputs[1]))


def test_a_rank_above_the_module_s_smaller_side_is_refused_up_front(adapters, tmp_path,
                                                                     capsys):
    """A review: peft accepts rank_pattern ranks above min(d_out, d_in); the command
    fitted half the modules, then stopped naming a position ("factors[7]")."""
    bad = _copy(adapters[3], tmp_path / "toowide")
    weights = _weights(bad)
    rank = D_IN + 1
    weights[f"{MODULES[0]}.lora_A.weight"] = torch.zeros(rank, D_IN)
    weights[f"{MODULES[0]}.lora_B.weight"] = torch.zeros(D_OUT, rank)
    safetensors_torch.save_file(weights, str(bad / "adapter_model.safetensors"))
    config = json.loads((bad / "adapter_config.json").read_text())
    config["rank_pattern"] = {MODULES[0].removeprefix("base_model.model."): rank}
    (bad / "adapter_config.json").write_text(json.dumps(config))  # as peft saves it
    line = _run_bad(adapters, bad, tmp_path, capsys)
    assert f"rank {rank}, above min(d_out, d_in) = {D_IN}" in line


def test_a_config_whose_r_is_not_the_factors_rank_is_refused(adapters, tmp_path, capsys):
    """Noticed in a review: a folder whose adapter_config.json states another r than its
    factors' rank (which peft would not load) was refined."""
    bad = _copy(adapters[3], tmp_path / "otherrank")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = config["r"] + 1
    (bad / "adapter_config.json").write_text(json.dumps(config))
    line = _run_bad(adapters, bad, tmp_path, capsys)
    assert f"config's r says {config['r']}: peft would not load this adapter" in line


def test_target_parameters_adapters_are_refused(adapters, tmp_path, capsys):
    """A review: adapters of peft's target_parameters (stacked MoE experts) were
    refined as if B @ A were the update; peft pairs their factors per expert."""
    bad = _copy(adapters[3], tmp_path / "experts")
    config = json.loads((bad / "adapter_config.json").read_text())
    config["target_parameters"] = ["experts.gate_up_proj"]
    (bad / "adapter_config.json").write_text(json.dumps(config))
    assert "target_parameters" in _run_bad(adapters, bad, tmp_path, capsys)
    with pytest.raises(ValueError, match="target_parameters"):
        refine_adapters([_weights(a) for a in adapters[:3]], config)


@pytest.mark.parametrize("name", ["report.json", ".clairstat-staging-x"])
def test_a_folder_named_as_the_command_s_own_files_is_refused(adapters, tmp_path, capsys,
                                                              name):
    """A review: a client folder called report.json failed after every fit; one called
    .clairstat-staging-x was later reported as a killed run's leftover."""
    bad = _copy(adapters[3], tmp_path / name)
    assert "the command's own" in _run_bad(adapters, bad, tmp_path, capsys)


def test_tensors_for_dask_workers_travel_one_by_one_whatever_holds_them():
    """Every torch tensor is packed on its own (bf16 included), wherever it is: a dict
    that mixes tensors with other values, or has non-string keys, kept its tensors raw
    or failed in a first version (a review); keys keep their order."""
    import torch

    from clairstat._cli import ModuleFit, _pack, _unpack

    tensor = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    value = (ModuleFit([False], [0.5], None, [{"z": tensor, "a": tensor.T}], []),
             {3: tensor, "note": "text", "n": 2}, [tensor[:, 1]])
    packed = _pack(value)
    assert "Tensor" not in repr(packed)  # nothing raw crosses to a worker
    back = _unpack(packed)
    assert list(back[0].states[0]) == ["z", "a"] and list(back[1]) == [3, "note", "n"]
    for got, want in ((back[0].states[0]["z"], tensor), (back[0].states[0]["a"], tensor.T),
                      (back[1][3], tensor), (back[2][0], tensor[:, 1])):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert back[1]["note"] == "text" and back[0].p_values == [0.5]


def test_the_untested_tensors_check_reads_slices_and_other_dtypes(tmp_path, monkeypatch):
    """The check of untested tensors reads a tensor in slices of rows (a non-finite
    value in a late slice is found), widens float8 (torch has no isfinite for it: an
    fp8 head made a valid adapter "unreadable", a review), checks complex tensors and
    leaves integer ones and scalars alone."""
    import clairstat._cli as cli

    weights = {"base_model.model.m.lora_A.weight": torch.randn(2, 5),
               "base_model.model.m.lora_B.weight": torch.randn(4, 2),
               "base_model.model.head.weight": torch.randn(300, 7).to(torch.float8_e4m3fn),
               "base_model.model.ids": torch.arange(5),
               "base_model.model.phase": torch.tensor([1 + 2j, 3 + 0j]),
               "base_model.model.scalar": torch.tensor(1.5)}
    folder = tmp_path / "client"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2}))
    monkeypatch.setattr(cli, "_CHECK_BYTES", 64)  # one row a slice
    safetensors_torch.save_file(weights, str(folder / "adapter_model.safetensors"))
    cli._check_untested_finite(cli._read_adapter(folder))
    for key, bad in (("base_model.model.phase", torch.tensor([1j, complex("inf")])),
                     ("base_model.model.head.weight", None)):
        changed = dict(weights)
        if bad is None:
            head = torch.randn(300, 7)
            head[250, 3] = float("nan")
            bad = head.to(torch.bfloat16)
        changed[key] = bad
        safetensors_torch.save_file(changed, str(folder / "adapter_model.safetensors"))
        with pytest.raises(cli.InputError, match=rf"{key} \(copied untested"):
            cli._check_untested_finite(cli._read_adapter(folder))


def test_max_iter_and_tol_reach_every_module_s_solver(adapters, tmp_path, capsys):
    """A fit that stops at its iteration cap says "increase max_iter or tol", which the
    command could not do (a review): ``--max-iter`` and ``--tol`` are each module's
    solver's, recorded in the report. One iteration stops every module's solver at its
    cap (the warning, per module); the defaults do not."""
    capsys.readouterr()
    code = main(["refine", "--max-iter", "1", "--tol", "1e-9", "--random-state", "0",
                 "--out", str(tmp_path / "capped"), *map(str, adapters)])
    err = capsys.readouterr().err
    assert code == 0
    assert "stopped at iteration 1 " in err and "max_iter reached" in err
    report = json.loads((tmp_path / "capped" / "report.json").read_text())
    assert report["max_iter"] == 1 and report["tol"] == 1e-9
    code = main(["refine", "--random-state", "0", "--out", str(tmp_path / "default"),
                 *map(str, adapters)])
    assert code == 0 and "max_iter reached" not in capsys.readouterr().err
    report = json.loads((tmp_path / "default" / "report.json").read_text())
    # the values the solvers ran with, not null for a default (a review)
    from clairstat import CLAIREstimator

    defaults = CLAIREstimator()
    assert report["max_iter"] == defaults.max_iter and report["tol"] == defaults.tol


def test_report_gives_each_module_s_rank(adapters, tmp_path, capsys):
    """``report.json`` gives every module's fitted rank (a review could not see that
    each module's rank had reached what its collaborative clients span, so that
    ``--per-module`` wrote the inputs back): ``--per-module --rank R`` fits every
    module at R; the joint refinement reports the modules' own fits too."""
    for name, options in {"per_module": ["--per-module", "--rank", "1"], "joint": []}.items():
        code = main(["refine", *options, "--random-state", "0", "--out",
                     str(tmp_path / name), *map(str, adapters)])
        assert code == 0
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert set(report["module_ranks"]) == set(MODULES)
        assert all(isinstance(rank, int) for rank in report["module_ranks"].values())
        if options:
            assert set(report["module_ranks"].values()) == {1}


def test_the_report_gives_a_float32_fit_s_scaled_tolerance():
    """In float32 the default tolerance is scaled to the dtype's precision: the report
    says the value the solvers used."""
    import numpy as np

    from clairstat import _cli

    args = _cli._parser().parse_args(["refine", "--dtype", "float32", "--out", "o",
                                           "a"])
    settings = _cli._solver_settings(args)
    assert settings["tol"] == 1e2 * float(np.finfo(np.float32).eps)
    args = _cli._parser().parse_args(["refine", "--dtype", "float32", "--tol", "1e-3",
                                           "--out", "o", "a"])
    assert _cli._solver_settings(args)["tol"] == 1e-3


@pytest.mark.filterwarnings("ignore:only")
def test_an_interrupt_inside_a_tensor_read_is_reported_as_the_interrupt(
        adapters, tmp_path, capsys, monkeypatch):
    """A signal that lands inside safetensors' read: torch turns the KeyboardInterrupt
    its handler raises into another error, which the run reported as an unreadable
    input, blaming a healthy client's file (a review: 1 of 21 SIGTERMs). The handler
    records the signal; the run ends as interrupted (143 for SIGTERM, one line), OUT
    not created."""
    import signal

    from clairstat import _cli

    import safetensors

    real_open = safetensors.safe_open
    calls = []

    class Interrupted:  # safe_open whose third read is hit by the signal
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, key):
            calls.append(key)
            if len(calls) == 3:
                try:  # what torch does with an interrupt raised inside its storage access
                    _cli._interrupt(signal.SIGTERM, None)
                except KeyboardInterrupt:
                    raise RuntimeError("could not determine the shape of object type "
                                       "'torch.storage.UntypedStorage'") from None
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(safetensors, "safe_open", Interrupted)
    out = tmp_path / "new" / "out"
    assert main(["refine", "--out", str(out), *map(str, adapters)]) == 143
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "clairstat refine: interrupted by SIGTERM"
    assert "unreadable" not in err and "Traceback" not in err
    assert not (tmp_path / "new").exists()
    assert len(calls) == 3
    # without the recorded signal the same error is an unreadable input
    calls.clear()
    _cli._SIGNALLED = None
    clients = _cli._read_all(list(adapters))
    with pytest.raises(_cli.InputError, match="unreadable"):
        for module in MODULES:
            for client in clients:
                _cli._read_module(client, module)
    assert _cli._SIGNALLED == signal.SIGTERM  # the handler ran (and was not reset)
    _cli._SIGNALLED = None
    # the next run is not taken for interrupted
    monkeypatch.undo()
    assert main(["refine", "--random-state", "0", "--out", str(out), *map(str, adapters)]) == 0


def test_a_newline_in_a_folder_name_stays_on_one_line(adapters, tmp_path, capsys):
    """The error names the folder with its control characters escaped: one line."""
    bad = _copy(adapters[0], tmp_path / "bad\nname\x85\u2028x")
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["refine", "--out", str(tmp_path / "out"), str(bad),
                 *map(str, adapters[1:])]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "bad\\nname\\x85\\u2028x" in err and "unreadable" in err


def test_joint_and_per_module_are_alternatives(adapters, tmp_path, capsys):
    for options in (["--joint", "--per-module"], ["--per-module", "--joint"]):
        with pytest.raises(SystemExit) as exit_:
            main(["refine", *options, "--out", str(tmp_path / "out"), *map(str, adapters)])
        assert exit_.value.code == 2
        assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
    assert "the following arguments are required: {refine}" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:only")
def test_rank_errors_name_the_option(adapters, tmp_path, capsys):
    """--rank errors in the command line's words (a review: "rank=100 exceeds min(p, q *
    n_clients) = 8; choose a smaller rank or None", no option or module named)."""
    out = str(tmp_path / "out")
    cases = [(["--rank", "-1"], "clairstat refine: error: --rank -1: must be a "
                                "non-negative integer"),
             (["--per-module", "--rank", "-1"], "clairstat refine: error: --rank -1: must "
                                                "be an int in the range [0, inf)"),
             (["--rank", "100"], "clairstat refine: error: --rank 100: the joint rank 100 "
                                 "exceeds what"),
             (["--per-module", "--rank", "100"],
              f"clairstat refine: error: --rank 100: exceeds what module {MODULES[0]} "
              "supports (at most ")]
    for options, expected in cases:
        assert main(["refine", *options, "--out", out, *map(str, adapters)]) == 2
        err = capsys.readouterr().err.splitlines()
        assert err[-1].startswith(expected), (options, err[-1])
        assert not Path(out).exists()


@pytest.mark.filterwarnings("ignore:only")
def test_the_report_says_where_a_module_s_detection_cycled(refined, adapters, tmp_path,
                                                           monkeypatch):
    """module_flagged may differ from the adjusted p-value's verdict where the detection
    cycled; report.json says which modules converged (a review), from each fit."""
    from clairstat import _cli

    report = json.loads((refined / "report.json").read_text())
    assert report["module_detection_converged"] == {m: True for m in report["modules"]}
    real_fit = _cli.fit_module

    def cycled_in_v(module, *args):  # as if the v_proj fit had cycled
        fit = real_fit(module, *args)
        return fit._replace(converged=False) if module == MODULES[1] else fit

    monkeypatch.setattr(_cli, "fit_module", cycled_in_v)
    out = tmp_path / "out"
    assert main(["refine", "--random-state", "0", "--out", str(out), *map(str, adapters)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["module_detection_converged"] == {MODULES[0]: True, MODULES[1]: False}


@pytest.mark.filterwarnings("ignore:only")
def test_an_ignored_sigint_stays_ignored(adapters, tmp_path, monkeypatch):
    """A background job of a non-interactive shell inherits SIGINT ignored: the command
    kept its own handler there and stopped on a SIGINT it should ignore (a review)."""
    import signal

    from clairstat import _cli

    seen = {}
    real = _cli.refine_command

    def refine(args):
        seen["sigint"] = signal.getsignal(signal.SIGINT)
        seen["sigterm"] = signal.getsignal(signal.SIGTERM)
        return real(args)

    monkeypatch.setattr(_cli, "refine_command", refine)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert main(["refine", "--random-state", "0", "--out", str(tmp_path / "out"),
                     *map(str, adapters)]) == 0
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen["sigint"] is signal.SIG_IGN and seen["sigterm"] is _cli._interrupt
