"""A real SLURM cluster (slurmctld + two slurmd "nodes" on this machine, started by
.ci/slurm.sh) runs launch/slurm/pretrain.sbatch on 2 nodes x 2 tasks on CPU (gloo):

- the job completes with the losses of the in-process reference (1e-5 relative, see
  launch_common.assert_close_to_reference);
- preemption: a second job gets SIGUSR1 mid-run (``scancel --signal=USR1 --batch``, what
  ``#SBATCH --signal=B:USR1@300`` does before the time limit), checkpoints, requeues itself
  (Restarts=1), resumes, and its losses equal the uninterrupted job's bitwise (same layout and
  arithmetic; the checkpoint restores weights, Adam state, RNG and data position exactly);
- launch/slurm/pretrain_torchrun.sbatch (one torchrun per node, two workers each) gives the
  same losses, and is preempted, requeued and resumed the same way;
- launch/slurm/preprocess_array.sbatch: an array job and a merge job chained with afterok give
  the bytes of an unsharded run; launch/slurm/convert.sbatch exports the trained checkpoint;
- the pure-Python host-list expansion agrees with ``scontrol show hostnames``.

The daemons are stopped by their PIDs at the end, and the /etc/hosts line is removed.
"""
import os
import re
import subprocess
import sys
import time

import pytest

from launch_common import (ROOT, TRAIN_ITERS, assert_close_to_reference, ensure_packages,
                           losses_by_iteration, reference_losses, train_args)

from megalite.distributed.launch_env import expand_hostlist

# Part of the default run (CI). They once timed out in about one run in three: the preemption
# test released the requeued job within the second of the requeue, and slurmd killed the new
# allocation as "Job credential revoked"; fixed below, then 18 repeated runs passed. One more
# run failed before any job: the cluster start exceeded the fixture's timeout while other
# 4-process tests loaded the machine, with no logs to show why; the start now has its own
# deadline, bounded sinfo calls, and the daemons' logs in the failure message.
# `make test-slurm` runs only these.
pytestmark = pytest.mark.slurm

SCRIPT = os.path.join(ROOT, ".ci", "slurm.sh")
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Environment (SLURM_CONF) of a running two-node cluster."""
    ensure_packages()
    d = str(tmp_path_factory.mktemp("slurm"))
    try:   # the script gives up by itself after 60 s and prints the daemons' logs
        r = subprocess.run(["bash", SCRIPT, "start", d], capture_output=True, text=True,
                           timeout=180)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["bash", SCRIPT, "stop", d], capture_output=True, timeout=60)
        pytest.fail(f".ci/slurm.sh start hung for {e.timeout} s:\n{e.stdout}\n{e.stderr}\n"
                    + _daemon_logs(d))
    if r.returncode != 0:
        subprocess.run(["bash", SCRIPT, "stop", d], capture_output=True, timeout=60)
        pytest.fail(f"cluster did not start:\n{r.stdout}\n{r.stderr}")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(SLURM_CONF=os.path.join(d, "slurm.conf"), OMP_NUM_THREADS="1")
    try:
        yield env
    finally:
        subprocess.run(["bash", SCRIPT, "stop", d], capture_output=True, timeout=60)


def _daemon_logs(d: str, tail: int = 3000) -> str:
    logs = os.path.join(d, "log")
    if not os.path.isdir(logs):
        return "(no daemon logs)"
    return "\n".join(f"--- {name}\n{open(os.path.join(logs, name)).read()[-tail:]}"
                     for name in sorted(os.listdir(logs)))


def _run(cmd, env, **kw):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def _submit(env, workdir, log_json, script="pretrain.sbatch", shape=("--ntasks-per-node", "2"),
            **extra_env) -> str:
    out = _run(["sbatch", "--parsable", "-N", "2", *shape, "--chdir", workdir,
                "--output", os.path.join(workdir, "job-%j.out"),
                os.path.join(ROOT, "launch", "slurm", script), *train_args(log_json)],
               {**env, "CKPT_DIR": os.path.join(workdir, "ckpt"), **extra_env})
    return out.strip().split(";")[0]


def _job_field(env, job, name) -> str | None:
    r = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True)
    m = re.search(rf"\b{name}=(\S+)", r.stdout)
    return m.group(1) if m else None


TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _wait(env, job, workdir, on_poll=None, done=None) -> None:
    """Poll until the job is in a final state and ``done()`` (default: nothing more) holds.

    Polling ``scontrol show job`` every 0.3 s is faster than sbatch --wait's back-off, and,
    unlike an empty ``squeue``, it does not mistake the moment of a requeue for the end.
    """
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        if on_poll is not None:
            on_poll()
        if _job_field(env, job, "JobState") in TERMINAL and (done is None or done()):
            return
        time.sleep(0.3)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} not finished after {JOB_TIMEOUT_S} s; log:\n{_log(workdir, job)}")


def _log(workdir, job, tail: int | None = 4000) -> str:
    path = os.path.join(workdir, f"job-{job}.out")
    if not os.path.exists(path):
        return "(no log)"
    text = open(path).read()
    return text if tail is None else text[-tail:]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """Losses of pretrain.sbatch run to the end on 2 nodes x 2 tasks."""
    work = str(tmp_path_factory.mktemp("job"))
    log = os.path.join(work, "log.jsonl")
    job = _submit(cluster, work, log)
    _wait(cluster, job, work)
    assert _job_field(cluster, job, "JobState") == "COMPLETED", _log(work, job)
    assert _job_field(cluster, job, "Restarts") == "0"
    return losses_by_iteration(log), work


def test_hostlist_matches_scontrol(cluster):
    for hostlist in ("n[1-3,5],gpu-[01-02]", "node[009-011]", "r[1-2]n[1-2]", "a,b-[7-8]",
                     "n[1-2],,m", "n[8-10]"):
        out = _run(["scontrol", "show", "hostnames", hostlist], cluster)
        assert expand_hostlist(hostlist) == out.split(), hostlist


def test_pretrain_job_matches_reference(uninterrupted, tmp_path):
    losses, work = uninterrupted
    assert_close_to_reference(losses, reference_losses(str(tmp_path)))
    assert "4 tasks on mln[1-2]" in open(next(
        os.path.join(work, f) for f in os.listdir(work) if f.endswith(".out"))).read()


def _preempted_run(cluster, work, script="pretrain.sbatch", shape=("--ntasks-per-node", "2"),
                   **extra_env):
    """Submit ``script``, USR1 its batch shell after 5 iterations, release the requeued job;
    returns (losses, the job's own messages, job id) once the requeued run has ended."""
    log = os.path.join(work, "log.jsonl")
    job = _submit(cluster, work, log, script, shape, **extra_env)
    state = {"signalled": False, "released": False, "held_at": None}

    def on_poll():
        if not state["signalled"] and os.path.exists(log) and len(losses_by_iteration(log)) >= 5:
            # like `#SBATCH --signal=B:USR1@N`: only the batch shell gets it
            _run(["scancel", "--signal=USR1", "--batch", job], cluster)
            state["signalled"] = True
        if state["signalled"] and not state["released"] and \
                _job_field(cluster, job, "Reason") == "BeginTime":
            # A requeued job is held ~2 minutes; release it sooner, but not within the second
            # of the requeue: slurmd revokes the old run's credentials with a 1-second
            # timestamp, and a new allocation stamped in that same second is killed as "Job
            # credential revoked" (the job then ends FAILED and never resumes).
            state["held_at"] = state["held_at"] or time.monotonic()
            if time.monotonic() - state["held_at"] >= 3.0:
                _run(["scontrol", "update", f"JobId={job}", "StartTime=now"], cluster)
                state["released"] = True

    def requeued_run_ended():
        # `scontrol requeue` kills the first run's batch script, so the job passes through
        # a final-looking state (FAILED, Restarts=1) before it is pending again: the end is
        # the requeued run's last line
        if not state["signalled"]:
            return True
        text = _log(work, job, tail=None)
        return "restart 1:" in text and "training step exited with" in \
            text.split("restart 1:", 1)[1]

    _wait(cluster, job, work, on_poll, done=requeued_run_ended)
    text = "\n".join(line for line in _log(work, job, tail=None).splitlines()
                     if not line.startswith(" iteration"))  # the job's own messages
    assert state["signalled"], text
    assert _job_field(cluster, job, "JobState") == "COMPLETED", text
    assert _job_field(cluster, job, "Restarts") == "1", text
    stop = re.search(r"stopping at iteration (\d+) \(signal\)", text)
    assert stop, f"the run ended before the signal arrived?\n{text}"
    assert 5 <= int(stop.group(1)) < TRAIN_ITERS
    assert f"resumed from {os.path.join(work, 'ckpt')} at iteration {stop.group(1)}" in text
    return losses_by_iteration(log), text, job


def test_preempted_job_requeues_and_resumes_exactly(cluster, uninterrupted, tmp_path):
    reference, _ = uninterrupted
    losses, _, _ = _preempted_run(cluster, str(tmp_path))
    assert losses == reference  # bitwise, every iteration


def test_preempted_torchrun_job_requeues_and_resumes(cluster, uninterrupted, tmp_path):
    """The torchrun variant: the batch shell's USR1 reaches the workers through srun and
    torchrun (--signals-to-handle), they checkpoint, the job requeues and resumes."""
    losses, text, _ = _preempted_run(cluster, str(tmp_path), "pretrain_torchrun.sbatch",
                                     ("--ntasks-per-node", "1", "--cpus-per-task", "2"),
                                     NPROC_PER_NODE="2")
    # torchrun exits 1 for its workers' 75; rank 0's stop file says it was a clean stop
    assert re.search(r"stopped at iteration \d+ \(signal\) \(exit 1\): requeueing", text), text
    assert_close_to_reference(losses, uninterrupted[0])


def test_torchrun_variant_matches_reference(cluster, uninterrupted, tmp_path):
    """pretrain_torchrun.sbatch: one torchrun per node (c10d rendezvous on the first node), two
    workers each; the same 4 ranks, so the same losses as the srun job (1e-5, see
    launch_common)."""
    work, log = str(tmp_path), str(tmp_path / "log.jsonl")
    job = _submit(cluster, work, log, "pretrain_torchrun.sbatch",
                  ("--ntasks-per-node", "1", "--cpus-per-task", "2"), NPROC_PER_NODE="2")
    _wait(cluster, job, work)
    assert _job_field(cluster, job, "JobState") == "COMPLETED", _log(work, job)
    assert "2 nodes x 2 workers" in _log(work, job, tail=None)
    assert_close_to_reference(losses_by_iteration(log), uninterrupted[0])


def test_preprocess_array_and_merge_equal_an_unsharded_run(cluster, corpus_jsonl, sp_model,
                                                           tmp_path):
    """`bash preprocess_array.sbatch` submits a 3-task array job and a merge job that waits for
    it (afterok); the merged .bin/.idx are byte-identical to one unsharded preprocess run."""
    import filecmp
    corpus = tmp_path / "small.jsonl"
    with open(corpus_jsonl, "rb") as f:
        corpus.write_bytes(b"".join(f.readlines()[:300]))
    env = {**cluster, "INPUT": str(corpus), "OUTPUT_PREFIX": str(tmp_path / "out" / "corpus"),
           "NUM_SHARDS": "3", "TOKENIZER_MODEL": sp_model, "WORKERS": "1",
           # the script's #SBATCH lines ask for a 16-CPU, 32 GB node; these nodes are smaller
           "SBATCH_EXTRA": f"--cpus-per-task=1 --mem=0 --output={tmp_path}/pre-%A_%a.out"}
    out = _run(["bash", os.path.join(ROOT, "launch", "slurm", "preprocess_array.sbatch")], env,
               cwd=tmp_path)
    m = re.search(r"submitted array job (\d+) \(3 shards\) and merge job (\d+)", out)
    assert m, out
    merge_job = m.group(2)
    logs = lambda: "\n".join(open(tmp_path / f).read() for f in sorted(os.listdir(tmp_path))
                             if f.startswith("pre-"))   # noqa: E731
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _job_field(cluster, merge_job, "JobState") not in TERMINAL:
        assert time.monotonic() < deadline, f"merge job not finished:\n{logs()}"
        time.sleep(0.3)
    # COMPLETED also shows the dependency held: a merge started before every shard was written
    # fails ("shard outputs missing").
    # (The array tasks' own records may already be purged, MinJobAge=30 s.)
    assert _job_field(cluster, merge_job, "JobState") == "COMPLETED", logs()
    text = logs()
    assert all(f"done (shard {i} of 3)" in text for i in range(3)), text
    assert "merged 3 datasets (300 documents" in text, text
    assert len(os.listdir(tmp_path / "out" / "corpus_shards")) == 6   # 3 x (.bin, .idx)
    r = subprocess.run([sys.executable, "-m", "megalite", "preprocess", "--input", str(corpus),
                        "--output-prefix", str(tmp_path / "full"), "--tokenizer-type",
                        "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for ext in ("bin", "idx"):
        assert filecmp.cmp(tmp_path / f"full_text_document.{ext}",
                           tmp_path / "out" / f"corpus_text_document.{ext}", shallow=False)


def test_convert_job_exports_the_trained_checkpoint(cluster, uninterrupted, tmp_path):
    """convert.sbatch on a node of the cluster: the pretrain job's checkpoint -> Hugging Face,
    with the logit check (--verify) passing."""
    _, work = uninterrupted
    hf = tmp_path / "hf"
    out = _run(["sbatch", "--parsable", "--cpus-per-task=1", "--mem=0", "--chdir", str(tmp_path),
                "--output", str(tmp_path / "convert-%j.out"),
                os.path.join(ROOT, "launch", "slurm", "convert.sbatch"), "to-hf", "--load",
                os.path.join(work, "ckpt"), "--save", str(hf), "--verify"], cluster)
    job = out.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _job_field(cluster, job, "JobState") not in TERMINAL:
        assert time.monotonic() < deadline, "convert job not finished"
        time.sleep(0.3)
    log = open(tmp_path / f"convert-{job}.out").read()
    assert _job_field(cluster, job, "JobState") == "COMPLETED", log
    assert "verified: max |logit difference|" in log and (hf / "config.json").exists()
