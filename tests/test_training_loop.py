"""minrnn_training.loop through `scripts/pretrain.py`: the main job end to end, data parallelism over gloo, early
errors, side outputs, publishing.

Runs are real subprocesses (`accelerate launch` or `python`) on a tiny model; each takes seconds to a minute.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pretrain_runs import REPO, SCRIPT, TINY, TWO_PROCESSES, accelerate_launch, env, run, step_losses, train_log

from minrnn_training.loop import main


def test_main_job_learns_and_output_loads(tmp_path):
    """The no-argument recipe (fewer steps): loss falls; the folder loads as remote code and generates."""
    out = tmp_path / "tiny"
    result = run(["--max-steps", "16", "--eval-every", "8", "--save-every", "8", "--output-dir", str(out)],
                 launcher=accelerate_launch("--num_processes", "1", "--cpu"))
    assert "eval loss" in result.stdout and "perplexity" in result.stdout and "--- sample ---" in result.stdout
    losses = step_losses(out)
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (15, 16)) / 2
    assert last < first - 0.3, f"training loss did not fall: {first:.3f} -> {last:.3f}"
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["dataset"] == "pydoc_data.topics" and summary["steps"] == 16
    assert summary["tokens_seen"] == 16 * 16 * 128
    assert summary["final_eval_loss"] < math.log(1024) and summary["config"]["max_steps"] == 16
    assert math.isclose(summary["final_eval_perplexity"], math.exp(summary["final_eval_loss"]))
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))

    # Loaded where the package is not importable: only the folder's own code files serve.
    check = f"""
import sys
sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
tokenizer = AutoTokenizer.from_pretrained({str(out)!r})
generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
text = generator("The class", max_new_tokens=8, do_sample=False)[0]["generated_text"]
assert text.startswith("The class") and len(text) > len("The class"), text
chat = generator([{{"role": "user", "content": "Who are you?"}}], max_new_tokens=4, do_sample=False)
assert chat[0]["generated_text"][-1]["role"] == "assistant", chat  # the saved chat template serves chat tools
print("OK", repr(text))
"""
    bare = {k: v for k, v in env().items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=bare, capture_output=True, text=True,
                            timeout=300, check=False)
    assert loaded.returncode == 0 and "OK" in loaded.stdout, loaded.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """2 gloo processes x 4 rows == 1 process x 8 rows: the same trajectory (which rows each process takes:
    test_training_data.py)."""
    common = [*TINY, "--max-steps", "5", "--eval-every", "5", "--save-every", "5"]
    run([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    run([*common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], launcher=TWO_PROCESSES)
    one, two = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    for a, b in zip([r for r in one if "loss" in r], [r for r in two if "loss" in r], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5), (a, b)
    eval_one = json.loads((tmp_path / "one" / "training_summary.json").read_text())["final_eval_loss"]
    eval_two = json.loads((tmp_path / "two" / "training_summary.json").read_text())["final_eval_loss"]
    assert eval_one == pytest.approx(eval_two, rel=1e-4)


def test_diverged_loss_is_one_line(tmp_path):
    result = run([*TINY, "--batch-size", "2", "--max-steps", "5", "--lr", "1e30", "--min-lr", "1e30", "--warmup-steps",
                  "0", "--output-dir", str(tmp_path / "out")], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(r"\nerror: training loss became (nan|inf) at step \d; lower lr \(now 1e\+30\)", result.stderr)


def test_missing_side_output_packages_and_unapplied_fsdp(tmp_path):
    """Without matplotlib and tensorboard the run warns before the first step and trains to the end; an FSDP
    accelerate config that accelerate cannot apply on CPUs is named at start."""
    hide = tmp_path / "without_plots.py"
    hide.write_text("import runpy, sys\n"
                    "sys.modules.update(matplotlib=None, tensorboard=None, tensorboardX=None)  # import fails\n"
                    f"sys.argv[0] = {str(SCRIPT)!r}\n"
                    f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    out = tmp_path / "out"
    result = run([*TINY, "--log-with", "tensorboard", "--batch-size", "2", "--max-steps", "2", "--eval-every", "1",
                  "--output-dir", str(out)], script=hide,
                 launcher=accelerate_launch("--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"),
                                            "--num_processes", "1", "--main_process_port", "0"))
    first_step = result.stderr.index("training:")  # the progress bar
    assert result.stderr.index("warning: TensorBoard logs skipped: tensorboard is not installed") < first_step
    assert result.stderr.index("warning: loss_curve.png skipped: matplotlib is not installed") < first_step
    assert "step 2: eval loss" in result.stdout
    assert ("warning: the accelerate config asks for FSDP, but accelerate runs MULTI_CPU here (no GPU): every "
            "process holds the whole model") in result.stderr
    assert "1 process(es), distributed mode MULTI_CPU" in result.stdout
    assert (out / "training_summary.json").is_file() and not (out / "loss_curve.png").exists()
    assert not (out / "tensorboard").exists()


def test_accelerate_configs_are_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}
    for name, kind in kinds.items():
        config = load_config_from_file(str(REPO / "configs" / "accelerate" / f"{name}.yaml"))
        assert config.distributed_type.name == kind and config.num_processes == 8
    fsdp = load_config_from_file(str(REPO / "configs" / "accelerate" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "MinRNNBlock"
    import modeling_minrnn.modeling_minrnn as modeling

    assert hasattr(modeling, fsdp["fsdp_transformer_layer_cls_to_wrap"])


@pytest.mark.parametrize("extra, message", [
    (["--dataset", "missing/file.txt"], r"--dataset missing/file.txt: no such file"),
    (["--dataset", "nobody-h4/no-such-dataset"], r"could not be loaded from the Hub"),
    (["--dataset", "EMPTY"], r"has no text"),
    (["--block-size", "200000"], r"block_size=200000 is larger than the validation data"),
    (["--vocab-size", "100"], r"vocab_size=100 is smaller than the tokenizer's 300 tokens"),
    (["--resume"], r"--resume: no complete checkpoint in"),
])
def test_bad_input_fails_before_training(tmp_path, monkeypatch, extra, message):
    import datasets
    import huggingface_hub

    # A Hub id that cannot load must fail the same way offline; offline it fails at once (no retries).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    extra = [str(empty) if arg == "EMPTY" else arg for arg in extra]
    with pytest.raises(SystemExit, match=f"(?s)^error: .*{message}"):
        main([*TINY, "--output-dir", str(tmp_path / "out"), *extra])
    assert not (tmp_path / "out").exists()  # nothing left behind (a trained tokenizer would refuse the next try)


def test_push_to_hub_publishes_checkpoints_and_final_folder(tmp_path, monkeypatch, capsys):
    """`--push-to-hub` hands each checkpoint's model folder (branch step-N) and the final folder (main) to hub_upload;
    a failed upload is a warning, the run goes on."""
    import hub_upload.push_to_hub as hub

    pushed = []

    def fake_push(folder, repo_id, **kwargs):
        hub.collect_checkpoint(folder)  # the uploader's own checks: a complete save_pretrained folder
        pushed.append((Path(folder), repo_id, kwargs["revision"]))
        if kwargs["revision"] == "step-1":
            raise hub.PublishError("cannot reach the Hub at https://hub.test (ConnectionError)")

    monkeypatch.setattr(hub, "push_checkpoint", fake_push)
    out = tmp_path / "out"
    main([*TINY, "--batch-size", "2", "--max-steps", "2", "--save-every", "1", "--output-dir", str(out),
                   "--push-to-hub", "me/tiny"])
    checkpoints = out / "checkpoints"
    assert pushed == [(checkpoints / "step-0000001" / "pretrained", "me/tiny", "step-1"),
                      (checkpoints / "step-0000002" / "pretrained", "me/tiny", "step-2"),
                      (out, "me/tiny", None)]
    first = checkpoints / "step-0000001" / "pretrained"
    assert (f"warning: {first} not published (cannot reach the Hub at https://hub.test (ConnectionError)); retry "
            f"with python hub_upload/push_to_hub.py --checkpoint {first} --repo-id me/tiny --revision step-1"
            ) in capsys.readouterr().err


@pytest.mark.slow
def test_init_from_a_finished_run_then_resume_it_is_refused(tmp_path):
    """`--init-from` a finished run's folder (or one of its checkpoints) trains its model (architecture, weights,
    tokenizer) further on new data under a new schedule; `--resume` on the finished run says in one line that it
    finished and what to do instead."""
    import torch
    from safetensors.torch import load_file

    first = tmp_path / "first"
    main([*TINY, "--batch-size", "4", "--max-steps", "12", "--eval-every", "12", "--save-every", "6",
          "--sample-tokens", "0", "--output-dir", str(first)])
    for extra in ([], ["--max-steps", "600"]):
        with pytest.raises(SystemExit) as refused:
            main([*TINY, "--batch-size", "4", "--max-steps", "12", "--output-dir", str(first), "--resume", *extra])
        assert str(refused.value) == (
            f"error: --resume: the run in {first} finished (12 steps, training_summary.json); to train its model "
            f"further start a new run from it: --init-from {first} --output-dir NEW_FOLDER, with its own data and "
            "schedule (--dataset, --max-steps, --lr)")

    new_data = tmp_path / "new.txt"
    new_data.write_text("".join(f"def function_{i}(self, value):\n    return value + {i}\n\n" for i in range(400)))
    common = [*TINY, "--dataset", str(new_data), "--batch-size", "4", "--sample-tokens", "0", "--eval-every", "2",
              "--save-every", "2", "--hidden-size", "48"]  # the architecture is the checkpoint's, not this option's
    frozen = tmp_path / "frozen"  # a learning rate too small to move the weights: the folder's weights, trained on
    main([*common, "--init-from", str(first), "--max-steps", "1", "--lr", "1e-12", "--min-lr", "1e-12",
          "--output-dir", str(frozen)])
    before, after = load_file(first / "model.safetensors"), load_file(frozen / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-9, msg=name)
    assert (frozen / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()

    # A checkpoint of the run (step 6 of 12) serves too: its weights, without a save_pretrained copy of them.
    middle = first / "checkpoints" / "step-0000006"
    from_middle = tmp_path / "from_middle"
    main([*common, "--init-from", str(middle), "--max-steps", "1", "--lr", "1e-12", "--min-lr", "1e-12",
          "--output-dir", str(from_middle)])
    saved, loaded = load_file(middle / "model.safetensors"), load_file(from_middle / "model.safetensors")
    assert saved.keys() <= loaded.keys() and any(not torch.equal(saved[k], before[k]) for k in saved)
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=1e-9, msg=name)

    tuned, fresh = tmp_path / "tuned", tmp_path / "fresh"
    main([*common, "--init-from", str(first), "--max-steps", "4", "--lr", "1e-3", "--output-dir", str(tuned)])
    main([*common, "--tokenizer", str(first), "--hidden-size", "32", "--max-steps", "4", "--lr", "1e-3",
          "--output-dir", str(fresh)])
    summary = json.loads((tuned / "training_summary.json").read_text())
    assert summary["dataset"] == str(new_data) and summary["steps"] == 4
    assert summary["config"]["init_from"] == str(first) and summary["config"]["hidden_size"] == 32
    # The pretrained model starts far lower on the new data than the same model from scratch.
    assert step_losses(tuned)[1] < step_losses(fresh)[1] - 0.5, (step_losses(tuned), step_losses(fresh))


def test_init_from_something_else_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: init_from='no/such/folder': not a save_pretrained folder, a "
                                         r"run's checkpoint or a reachable Hub model \("):
        main([*TINY, "--init-from", "no/such/folder", "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_process(tmp_path):
    """docs/pretraining.md's multi-node recipe, run as 2 nodes x 1 process on 127.0.0.1 over gloo (one launcher per
    node, a shared output folder): the same trajectory as 1 process with both nodes' rows."""
    common = [*TINY, "--max-steps", "4", "--eval-every", "4", "--save-every", "2"]
    run([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")])
    port = _free_port()
    nodes = [
        subprocess.Popen(
            [*accelerate_launch("--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank",
                                str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                                "--mixed_precision", "no", "--dynamo_backend", "no"),
             str(SCRIPT), *common, "--batch-size", "4", "--output-dir", str(tmp_path / "two")],
            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "2 process(es), distributed mode MULTI_CPU" in outputs[0][0]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    assert sorted(path.name for path in (tmp_path / "two" / "checkpoints" / "step-0000004").glob("data_state_*")) == [
        "data_state_rank0.json", "data_state_rank1.json"]


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_trainer_steps_run_one_by_one(tmp_path):
    """The loop's named steps, driven by hand as `train` drives them: set-up, optimizer steps, evaluation, a
    checkpoint, the final folder."""
    from minrnn_training.config import parse_args
    from minrnn_training.loop import Trainer, preflight

    config, options = parse_args([*TINY, "--batch-size", "2", "--max-steps", "2", "--sample-tokens", "0",
                                  "--output-dir", str(tmp_path / "out")])
    trainer = Trainer(config, options, preflight(config, options))
    first, second = trainer.train_step(0), trainer.train_step(1)
    assert (first["step"], second["step"]) == (1, 2) and second["tokens_seen"] == 2 * 2 * 32
    assert second["loss"] < first["loss"] and math.isfinite(second["grad_norm"])
    eval_loss = trainer.evaluate(2)
    trainer.save(2)
    summary = trainer.finish(eval_loss)
    assert [r["step"] for r in train_log(tmp_path / "out")] == [1, 2, 2]
    assert (tmp_path / "out" / "checkpoints" / "step-0000002" / "tokenizer" / "tokenizer.json").is_file()
    assert summary["model_files"] and all((tmp_path / "out" / name).is_file() for name in summary["model_files"])


@pytest.mark.slow
def test_init_from_a_hub_model_id(tmp_path):
    """`--init-from user/model` downloads the model and its tokenizer from the Hub (the loopback one of
    tests/hub_server.py) and trains from its weights."""
    import os

    import torch
    from hub_server import LoopbackHub
    from safetensors.torch import load_file

    first = tmp_path / "first"
    main([*TINY, "--batch-size", "2", "--max-steps", "2", "--sample-tokens", "0", "--output-dir", str(first)])
    files = json.loads((first / "training_summary.json").read_text())["model_files"]
    with LoopbackHub(tokens={"hf_secret": "alice"}) as hub:
        hub_env = {**env(), "HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": "hf_secret",
                   "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            hub_env.pop(key, None)
        upload = ("from huggingface_hub import HfApi; api = HfApi(); api.create_repo('alice/tiny'); "
                  f"api.upload_folder(folder_path={str(first)!r}, repo_id='alice/tiny', allow_patterns={files!r})")
        subprocess.run([sys.executable, "-c", upload], env=hub_env, check=True, capture_output=True, timeout=300)
        tuned = tmp_path / "tuned"
        result = subprocess.run(
            [sys.executable, str(SCRIPT), *TINY, "--init-from", "alice/tiny", "--batch-size", "2", "--max-steps", "1",
             "--lr", "1e-12", "--min-lr", "1e-12", "--sample-tokens", "0", "--output-dir", str(tuned)],
            cwd=REPO, env=hub_env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from alice/tiny" in result.stdout and os.path.isdir(tmp_path / "hf_home")
    before, after = load_file(first / "model.safetensors"), load_file(tuned / "model.safetensors")
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-9, msg=name)


def test_fused_loss_trains_the_same_steps(tmp_path):
    """`--fused-linear-cross-entropy`: the same losses step by step (rounding aside), in the saved config."""
    from minrnn_training.config import parse_args
    from minrnn_training.loop import Trainer, preflight

    losses = {}
    for fused in (False, True):
        extra = ["--fused-linear-cross-entropy"] if fused else []
        config, options = parse_args([*TINY, "--batch-size", "2", "--max-steps", "3", "--sample-tokens", "0",
                                      "--output-dir", str(tmp_path / str(fused)), *extra])
        trainer = Trainer(config, options, preflight(config, options))
        losses[fused] = [trainer.train_step(step)["loss"] for step in range(3)]
        assert trainer.model.config.fused_linear_cross_entropy is fused
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
