"""Several processes under `accelerate launch` (data parallel; gloo on CPUs, as NCCL on GPUs): one run directory,
one manifest, every log row written once, resume after a kill, and the numbers of one process on the same batch."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from rnlib import pipeline, train
from rnlib.config import load_profile

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _accelerate(*program: str, env: dict | None = None) -> subprocess.Popen:
    """`accelerate launch` of `program` in 2 processes (--multi_gpu picks gloo where there is no GPU)."""
    command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *program]
    return subprocess.Popen(command, env=os.environ | {"OMP_NUM_THREADS": "1"} | (env or {}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _launch(root: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """The study's CLI in 2 processes on the runs/ directory `root`."""
    return _accelerate("-m", "rnlib", "run", *args, "--profile", "smoke", env={"RN_RUNS": str(root)} | (env or {}))


def test_every_process_takes_the_main_process_decision_before_any_trainer_exists(tmp_path):
    """`pipeline.agree` broadcasts for real from the start (on CPUs accelerate sees a launch only when asked for
    `cpu=True`; without it every process kept its own value until a trainer had joined the process group)."""
    probe = tmp_path / "probe.py"  # each process writes a file of its own: their shared stdout can interleave
    probe.write_text("import os, pathlib\nfrom rnlib import pipeline\n"
                     f"pathlib.Path({str(tmp_path)!r}, f'agreed-{{os.getpid()}}').write_text("
                     "f'{pipeline.agree(os.getpid())} {os.getpid()}')\n"
                     "pipeline.wait_for_main()\n")  # leave together, as a run does: no process exits mid-collective
    launched = _accelerate(str(probe))
    _, err = launched.communicate(timeout=300)
    assert launched.returncode == 0, _failure(err)
    lines = [path.read_text().split() for path in sorted(tmp_path.glob("agreed-*"))]
    assert len(lines) == 2 and lines[0][0] == lines[1][0]  # one value: the main process's pid
    assert {lines[0][0]} < {lines[0][1], lines[1][1]} and lines[0][1] != lines[1][1]


@pytest.fixture(scope="module")
def two_process_root(aligned, tmp_path_factory):
    """A runs/ of its own (else the one-process runs would be reused), holding the session's aligned model."""
    root = tmp_path_factory.mktemp("two_processes")
    (root / aligned.id).symlink_to(aligned.path)
    return root


def _failure(err: str) -> str:
    """The main process's traceback of a failed launch (the others fail at their next barrier)."""
    lines = [line for line in err.splitlines() if line.startswith("[rank0]")] or err.splitlines()
    return "\n".join(lines[-40:])


def _logged_once(run: pipeline.Run, steps: int) -> None:
    assert run.finished and len(list(run.path.parent.glob(f"{run.id}*"))) == 1
    assert [s["step"] for s in run.steps()] == list(range(1, steps + 1))
    evaluated = [e["step"] for e in run.evals()]
    assert evaluated == sorted(set(evaluated)) and evaluated[0] == 0
    answers = [c for c in run.completions() if c["step"] == 0]
    assert len(answers) == len({(c["prompt_id"], c["kind"], c.get("sample")) for c in answers})


def test_two_processes_train_one_run_and_log_it_once_with_one_process_numbers(two_process_root, aligned, profile):
    alone = train.attack(profile, "cyber", start=aligned)
    launched = _launch(two_process_root, "attack", "--domain", "cyber")
    out, err = launched.communicate(timeout=900)
    assert launched.returncode == 0, _failure(err)
    assert out.count('"run":') == 1  # one answer, from the main process
    run = pipeline.Run(two_process_root / alone.id)  # same settings, same global batch: the same run id
    _logged_once(run, profile.attack.max_steps)
    assert run.manifest["attempts"] == 1 and run.manifest["status"] == "finished"
    # Before any update, the main process samples the evaluation exactly as one process does.
    for key in ("harm_mean", "eval_harm_mean", "refusal_rate"):
        assert run.evals()[0][key] == pytest.approx(alone.evals()[0][key], abs=1e-6)
    assert [e["harm_mean"] for e in run.evals()] == pytest.approx([e["harm_mean"] for e in alone.evals()], abs=0.5)
    # Training rewards come from other samples (each process draws its share of the groups): equal within noise,
    # three standard errors of the difference of the two means.
    answers = profile.attack.num_generations * profile.attack.prompts_per_step * profile.attack.max_steps
    spread = max(s["reward_std"] for s in run.steps() + alone.steps())
    mean_reward = [sum(s["reward"] for s in r.steps()) / len(r.steps()) for r in (run, alone)]
    assert abs(mean_reward[0] - mean_reward[1]) <= 3 * spread * (2 / answers) ** 0.5


def test_two_processes_resume_a_killed_run_from_its_checkpoint(two_process_root):
    launched = _launch(two_process_root, "sft_refusal", "--domain", "cyber")
    planned = train.stage_run(load_profile("smoke"), "sft_refusal", "cyber", 0,
                              start=next(two_process_root.glob("align-*")).name)
    run = pipeline.Run(two_process_root / planned.id)
    deadline = time.time() + 600
    while not (run.path / "checkpoints" / "checkpoint-2" / "trainer_state.json").is_file():
        assert launched.poll() is None and time.time() < deadline, _failure(launched.communicate()[1])
        time.sleep(0.2)
    workers = psutil.Process(launched.pid).children(recursive=True)  # torchrun starts them in sessions of their own
    for process in [psutil.Process(launched.pid), *workers]:  # mid-run, as a lost node would
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(workers, timeout=30)
    launched.wait()
    assert not run.finished
    resumed = _launch(two_process_root, "sft_refusal", "--domain", "cyber")
    out, err = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, _failure(err)
    assert run.manifest["attempts"] == 2
    _logged_once(run, load_profile("smoke").defend.max_steps)


def test_a_launch_waits_out_another_job_holding_its_run_for_longer_than_the_collective_timeout(two_process_root,
                                                                                           monkeypatch):
    """The other processes wait for the main one on a file, not in a collective that would time out meanwhile."""
    monkeypatch.setenv("RN_RUNS", str(two_process_root))
    run = train.stage_run(load_profile("smoke"), "sft_refusal", "biochem", 0,
                          start=next(two_process_root.glob("align-*")).name)
    pipeline.claim(run)  # another job is training it, for longer than the launch's collective timeout
    launched = _launch(two_process_root, "sft_refusal", "--domain", "biochem", env={"RN_COLLECTIVE_TIMEOUT_S": "20"})
    time.sleep(45)
    assert launched.poll() is None, _failure(launched.communicate()[1])
    run.start({"stage": "sft_refusal"})
    run.finish()  # releases the lock: the launch finds the run finished and reuses it
    out, err = launched.communicate(timeout=300)
    assert launched.returncode == 0, _failure(err)
    assert "waiting: another process is training" in err and f"reused {run.id}" in err
    assert out.count('"run":') == 1 and run.manifest["attempts"] == 1
    assert not list((two_process_root / ".locks").glob("*.held"))


def test_a_step_batch_is_split_over_the_processes_or_refused(monkeypatch):
    from rnlib.config import ConfigError

    assert train.per_process(8) == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.per_process(8) == 4
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="divides 8"):
        train.per_process(8)
