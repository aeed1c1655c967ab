"""The Ray executor: real Ray actors on this machine, the tiny model, the real round loop."""

import json

import pytest
import torch

ray = pytest.importorskip("ray", reason="the Ray executor needs `pip install -e .[sim]`")

from server_sdk.engine.executor import QuorumNotReached  # noqa: E402
from server_sdk.engine.ray_executor import RaySettings, ray_executor_factory  # noqa: E402
from server_sdk.engine.rounds import run  # noqa: E402

METRICS = ("stage", "round", "clients", "train_loss", "eval_loss", "per_task", "bytes_down", "bytes_up",
           "stage_download_bytes", "client_samples")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (the executor leaves a Ray it did not start running)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def _metrics(report: dict) -> str:
    """The report's metrics as JSON text: exact float comparison, and a NaN equals a NaN."""
    return json.dumps([{k: r.get(k) for k in METRICS} for r in report["records"]])


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _kill_once(at_call: int, worker: int = 0):
    """after_submit hook: kill one worker while the `at_call`-th round's tasks are in flight."""
    calls = {"n": 0}

    def hook(workers):
        calls["n"] += 1
        if calls["n"] == at_call:
            ray.kill(workers[worker])

    return hook


@pytest.fixture(scope="module")
def in_process_run(tiny_base, tiny_cfg, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("inproc") / "run"
    report = run(tiny_cfg(strategy="devft", torch_threads=1), run_dir, base=tiny_base, progress=False)
    return run_dir, report


def test_ray_run_is_bit_identical_to_in_process(local_ray, in_process_run, tiny_base, tiny_cfg, tmp_path):
    ref_dir, ref = in_process_run
    report = run(tiny_cfg(strategy="devft", torch_threads=1), tmp_path / "ray", base=tiny_base, progress=False,
                 executor_factory=ray_executor_factory(RaySettings(workers=2)))
    assert _metrics(report) == _metrics(ref)
    ours, theirs = _adapter(tmp_path / "ray"), _adapter(ref_dir)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_bf16_on_ray_is_bit_identical_to_bf16_in_process(local_ray, in_process_run, tiny_base, tiny_cfg, tmp_path):
    cfg = tiny_cfg(strategy="devft", torch_threads=1, precision="bf16")
    ref = run(cfg, tmp_path / "inproc", base=tiny_base, progress=False)
    report = run(cfg, tmp_path / "ray", base=tiny_base, progress=False,
                 executor_factory=ray_executor_factory(RaySettings(workers=2)))
    assert _metrics(report) == _metrics(ref)
    assert _metrics(report) != _metrics(in_process_run[1])  # and it is not the fp32 run


def test_killed_worker_round_aggregates_the_survivor(local_ray, tiny_base, tiny_cfg, tmp_path):
    report = run(tiny_cfg(strategy="devft", torch_threads=1), tmp_path / "run", base=tiny_base, progress=False,
                 executor_factory=ray_executor_factory(RaySettings(workers=2, quorum=0.5), after_submit=_kill_once(1)))
    rounds = [r for r in report["records"] if r["stage"] >= 0]
    assert len(rounds) == 3
    assert len(rounds[0]["clients"]) == 2 and len(rounds[0]["client_samples"]) == 1  # one of two answered
    # the dead worker was replaced: later rounds have both clients again
    assert [len(r["client_samples"]) for r in rounds[1:]] == [2, 2]


def test_killed_worker_below_quorum_fails_clearly_and_resumes(local_ray, in_process_run, tiny_base, tiny_cfg,
                                                              tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(strategy="devft", torch_threads=1)
    with pytest.raises(QuorumNotReached, match=r"1 of 2 sampled clients answered, quorum is 2.*--resume"):
        run(cfg, run_dir, base=tiny_base, progress=False,
            executor_factory=ray_executor_factory(RaySettings(workers=2, quorum=1.0), after_submit=_kill_once(2)))
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert (meta["stage"], meta["next_round"]) == (1, 0)  # the failed round (stage 1, round 0) is not in it
    report = run(cfg, run_dir, resume=True, base=tiny_base, progress=False,
                 executor_factory=ray_executor_factory(RaySettings(workers=2, quorum=1.0)))
    ref_dir, ref = in_process_run
    assert _metrics(report) == _metrics(ref)
    assert all(torch.equal(a, b) for a, b in zip(_adapter(run_dir).values(), _adapter(ref_dir).values()))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="workers=0"):
        RaySettings(workers=0).validate()
    with pytest.raises(ValueError, match="quorum=1.5"):
        RaySettings(quorum=1.5).validate()


def test_cli_runs_on_ray_and_refuses_ray_options_without_it(local_ray, tmp_path, capsys):
    from server_sdk.cli.main import main

    tiny = ["--model", "tiny-random-L4", "-o", "stages=[2, 4]", "-o", "rounds_per_stage=1", "-o", "num_clients=2",
            "-o", "local_steps=1", "-o", "batch_size=2", "-o", "seq_len=64", "-o", "lora.r=2",
            "-o", "data.examples_per_client=4", "-o", "data.eval_examples_per_task=1", "-o", "accuracy_every=never"]
    assert main(["run", *tiny, "--name", "r", "--runs-dir", str(tmp_path), "--quiet", "--executor", "ray",
                 "--workers", "2"]) == 0
    assert "fine-tuned" in capsys.readouterr().out
    assert main(["run", *tiny, "--name", "x", "--runs-dir", str(tmp_path), "--workers", "2"]) == 2
    assert "--workers and --ray-address need --executor ray" in capsys.readouterr().err
    assert main(["run", *tiny, "--name", "y", "--runs-dir", str(tmp_path), "--executor", "ray", "--workers", "0"]) == 2
    assert "workers=0 must be at least 1" in capsys.readouterr().err


def test_round_deadline_counts_slow_clients_as_missing_and_replaces_their_workers(local_ray, tiny_base, tiny_cfg,
                                                                                tmp_path):
    from server_sdk.engine.ray_executor import RayExecutor
    from server_sdk.engine.rounds import prepare_data
    from server_sdk.method.strategies import make_strategy

    cfg = tiny_cfg(strategy="fedit", torch_threads=1)
    clients, _ = prepare_data(cfg, tiny_base, tmp_path)
    strategy = make_strategy(cfg)
    ex = RayExecutor(cfg, tiny_base, clients, RaySettings(workers=2, quorum=0.5, round_timeout_s=1e-3))
    try:
        from server_sdk.method.lora import attach_lora, read_lora
        from server_sdk.method.submodel import share_model

        lora = read_lora(attach_lora(share_model(tiny_base.model), cfg.lora, seed=0))
        plan, _ = strategy.configure_stage(0, tiny_base.model, lora, tiny_base.n_layers)
        sub, init = strategy.build_submodel(tiny_base.model, lora, plan)
        ex.begin_stage(0, plan, sub)
        with pytest.raises(QuorumNotReached, match=r"0 of 2 sampled clients answered"):
            ex.train_round(0, 0, [0, 1], init, strategy.is_trainable, {0: 1, 1: 2})
        # with time to answer, the replaced workers train the stage again
        ex.settings.round_timeout_s = None
        results = ex.train_round(0, 1, [0, 1], init, strategy.is_trainable, {0: 1, 1: 2})
        assert [r.client for r in results] == [0, 1]
    finally:
        ex.close()


def _eval_cfg(tiny_cfg):
    """FedIT, two rounds, accuracy at the end; 24 held-out examples: two evaluation batches of 16 and 8,
    so two workers evaluate one batch each."""
    from server_sdk.config import DataSettings

    data = DataSettings(examples_per_client=6, eval_examples_per_task=6)
    return tiny_cfg(strategy="fedit", torch_threads=1, rounds_per_stage=2, accuracy_every="end", gen_max_new_tokens=2,
                    data=data)


@pytest.fixture(scope="module")
def in_process_eval_run(tiny_base, tiny_cfg, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inproc-eval")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEVFT_CACHE", str(tmp / "cache"))
        return run(_eval_cfg(tiny_cfg), tmp / "run", base=tiny_base, progress=False)


def _split_evaluations(monkeypatch) -> list:
    """The chunks of every evaluation the Ray executor splits from now on (recorded on the coordinator)."""
    import server_sdk.engine.ray_executor as rx

    seen, chunks = [], rx.eval_chunks
    monkeypatch.setattr(rx, "eval_chunks", lambda *a: seen.append(chunks(*a)) or seen[-1])
    return seen


def test_workers_evaluate_split_with_the_in_process_numbers_and_the_coordinator_runs_no_forward(
        local_ray, in_process_eval_run, tiny_base, tiny_base_from_file, tiny_cfg, tmp_path, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaModel

    calls = {"n": 0}
    forward = LlamaModel.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaModel, "forward", counted)  # this process only: Ray workers import their own
    tiny_base.model(input_ids=torch.tensor([[1, 2]]))
    assert calls["n"] == 1  # the counter sees a forward pass here
    calls["n"] = 0
    split = _split_evaluations(monkeypatch)
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache-ray"))  # the base model is evaluated again, on Ray
    report = run(_eval_cfg(tiny_cfg), tmp_path / "ray", base=tiny_base_from_file, progress=False,
                 executor_factory=ray_executor_factory(RaySettings(workers=2)))
    assert calls["n"] == 0  # neither the base model's evaluation nor a round's ran a forward pass here
    # the base model's and both rounds' evaluations, each split across the two workers at the batch boundary
    assert split == [[range(0, 16), range(16, 24)]] * 3
    ref = in_process_eval_run
    assert [r["eval_loss"] is not None for r in report["records"]] == [True, True, True]
    assert report["records"][-1]["accuracy"] is not None  # generation too
    assert _metrics(report) == _metrics(ref)  # eval losses and per-task numbers, exactly
    assert [r["accuracy"] for r in report["records"]] == [r["accuracy"] for r in ref["records"]]


def test_a_worker_killed_during_an_evaluation_loses_nothing(local_ray, in_process_eval_run, tiny_base, tiny_cfg,
                                                            tmp_path, monkeypatch, caplog):
    split = _split_evaluations(monkeypatch)
    monkeypatch.setenv("DEVFT_CACHE", str(tmp_path / "cache-ray"))
    # evaluation 2 (after round 1): worker 0 is killed once both parts are submitted; its part goes to worker 1
    report = run(_eval_cfg(tiny_cfg), tmp_path / "ray", base=tiny_base, progress=False,
                 executor_factory=ray_executor_factory(RaySettings(workers=2), after_eval_submit=_kill_once(2)))
    assert "Ray worker 0 died during an evaluation" in caplog.text
    assert split == [[range(0, 16), range(16, 24)]] * 3  # replaced before round 2: its evaluation is split again
    ref = in_process_eval_run
    assert _metrics(report) == _metrics(ref)
    assert [r["accuracy"] for r in report["records"]] == [r["accuracy"] for r in ref["records"]]


def test_a_stage_of_the_base_models_weights_maps_its_own_file(local_ray, tiny_base, tiny_base_from_file, tiny_cfg,
                                                              tmp_path):
    from server_sdk.engine.ray_executor import RayExecutor
    from server_sdk.engine.rounds import prepare_data
    from server_sdk.method.lora import attach_lora, read_lora
    from server_sdk.method.strategies import make_strategy
    from server_sdk.method.submodel import StagePlan, share_model

    cfg = tiny_cfg(strategy="fedit", torch_threads=1)
    clients, _ = prepare_data(cfg, tiny_base, tmp_path)
    # loaded from a file that holds them: nothing written; a random model's weights: written once, as the base's
    for base, written in ((tiny_base_from_file, []), (tiny_base, ["base.safetensors"])):
        ex = RayExecutor(cfg, base, clients, RaySettings(workers=1))
        try:
            lora = read_lora(attach_lora(share_model(base.model), cfg.lora, seed=0))
            strategy = make_strategy(cfg)
            plan, _ = strategy.configure_stage(0, base.model, lora, base.n_layers)
            sub, init = strategy.build_submodel(base.model, lora, plan)
            ex.begin_stage(0, plan, sub)
            assert sorted(p.name for p in ex.stage_dir.iterdir()) == written
            assert [r.client for r in ex.train_round(0, 0, [0], init, strategy.is_trainable, {0: 1})] == [0]
            # fused layers are not the base model's: that stage writes its own file
            fused = StagePlan(1, 3, [[0, 1], [2, 3], [4, 5]], [0, 2, 4])
            sub, _ = make_strategy(tiny_cfg(strategy="devft", beta=0.2)).build_submodel(base.model, lora, fused)
            ex.begin_stage(1, fused, sub)
            assert sorted(p.name for p in ex.stage_dir.iterdir()) == sorted([*written, "stage-1.safetensors"])
        finally:
            ex.close()


def test_frozen_arrays_cross_the_object_store_without_a_copy(local_ray, tiny_base, tmp_path):
    from server_sdk.engine.frozen import frozen_state, map_stage_file, write_frozen

    write_frozen(tmp_path / "s.safetensors", frozen_state(tiny_base.model))
    arrays = ray.get(ray.remote(num_cpus=0)(map_stage_file).remote(str(tmp_path / "s.safetensors")))
    # read-only views of the object store's shared memory: each worker maps them, none holds a copy
    assert all(not a.flags.writeable and not a.flags.owndata for a in arrays.values())
