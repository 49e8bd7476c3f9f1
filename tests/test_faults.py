"""Reliability under signals and faults (issue 11): Ctrl-C / SIGTERM stop a run between rounds with its
checkpoint kept, Ray shut down and no process of the run left; the run then resumes to the numbers of
an uninterrupted one. Each case starts real simulations (slow)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from octomil_sim.checkpoint import checkpoint_folders
from octomil_sim.reaper import descendants
from octomil_sim.reaper import still_running as alive

pytestmark = pytest.mark.slow

ARGS = [sys.executable, "-m", "octomil_sim", "strategy=fedavg", "simulation.num_clients=10",
        "simulation.clients_per_round=4", "simulation.fraction_evaluate=0", "progress=false"]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def interrupt_after(args: list[str], run_dir: Path, signum: int) -> tuple[int, str, float, dict]:
    """Start the run, wait until its client actors have trained for two seconds, send ``signum`` to the driver only (a terminal's
    Ctrl-C reaches the whole foreground group; the driver is the one that must act), and return (exit
    code, stderr, seconds from the signal to the exit, the processes it had started)."""
    proc = subprocess.Popen([*args, f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline, training = time.time() + 240, None
    tree: dict[int, str] = {}
    while time.time() < deadline and proc.poll() is None:
        tree.update(descendants(proc.pid))
        busy = any(_cmdline(pid).startswith(b"ray::ClientAppActor.run") for pid in tree)
        training = training or (time.time() if busy else None)
        if training and time.time() - training > 2:  # a few rounds in
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    tree.update(descendants(proc.pid))
    sent = time.time()
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run did not stop within 60 s of the signal")
    return proc.returncode, err, time.time() - sent, tree


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_the_run_keeps_its_checkpoint_and_leaves_no_process(tmp_path, signum, code):
    args = [*ARGS, "simulation.rounds=100000", "simulation.checkpoint_every=100000"]  # only the stop checkpoints
    run_dir = tmp_path / "run"
    rc, err, seconds, tree = interrupt_after(args, run_dir, signum)
    assert rc == code, err
    lines = [line for line in err.splitlines() if line.startswith("stopped by")]
    name = signal.Signals(signum).name
    assert len(lines) == 1 and lines[0].startswith(f"stopped by {name} after round "), err
    assert f"the same command with hydra.run.dir={run_dir} resumes it" in lines[0]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    last = int(lines[0].split("after round ")[1].split(";")[0])
    assert checkpoint_folders(run_dir)[0].name == f"round_{last:06d}"  # the round it stopped after is kept
    assert seconds < 30
    ends = time.time() + 30  # Ray's workers exit on their own once the driver shut Ray down (slowly on 2 busy cores)
    while alive(tree) and time.time() < ends:
        time.sleep(0.5)
    assert tree and not alive(tree), f"left running: {alive(tree)} of {sorted(tree)}"


def test_kill_9_of_the_driver_leaves_no_ray_process_behind(tmp_path):
    """kill -9 of the driver (no handler runs): Ray's agents used to wait about two minutes on the
    dead GCS; the run's reaper ends every process the driver had started within seconds."""
    proc = subprocess.Popen([*ARGS, "simulation.rounds=100000", f"hydra.run.dir={tmp_path / 'run'}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    tree: dict[int, str] = {}
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            tree.update(descendants(proc.pid))
            names = [_cmdline(pid) for pid in tree]
            if any(n.startswith(b"ray::DashboardAgent") for n in names) and any(n.startswith(b"ray::ClientAppActor")
                                                                               for n in names):
                break  # the agents and an actor (an agent takes its name once its imports are done: counting
                # ray:: processes found two actors and the other agent first on a loaded machine)
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        time.sleep(1)
        tree.update(descendants(proc.pid))
        assert any(_cmdline(pid).startswith(b"ray::DashboardAgent") for pid in tree), tree
    finally:  # also when an assertion above fails: a run of 100,000 rounds must not outlive the test
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # the run's reaper ends its Ray processes
        proc.wait()
    ends = time.time() + 20
    while alive(tree) and time.time() < ends:
        time.sleep(0.5)
    assert not alive(tree), f"left running: {[(p, _cmdline(p)[:40]) for p in alive(tree)]}"


def test_interrupted_run_resumes_to_the_uninterrupted_numbers(tmp_path):
    args = [*ARGS, "simulation.rounds=1500"]  # (long enough to be stopped part way: the driver serves the first rounds alone)
    straight = tmp_path / "straight"
    subprocess.run([*args, f"hydra.run.dir={straight}"], check=True, capture_output=True)
    stopped = tmp_path / "stopped"
    rc, err, _, _ = interrupt_after([*args, "simulation.checkpoint_every=100"], stopped, signal.SIGINT)
    assert rc == 130, err
    rerun = subprocess.run([*args, f"hydra.run.dir={stopped}"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    a, b = (json.loads((d / "results.json").read_text()) for d in (straight, stopped))
    assert [r["train_loss"] for r in a["rounds"]] == [r["train_loss"] for r in b["rounds"]]
    assert a["final"]["global_acc"] == b["final"]["global_acc"]


def test_interrupted_sweep_resumes_from_its_sweep_dir_and_finished_jobs_are_not_run_again(tmp_path):
    """Ctrl-C during a ``-m`` sweep ends the sweep with a hint naming its sweep dir; the same command then
    resumes the stopped job and runs the rest, and once more finds every job finished."""
    sweep = tmp_path / "sweep"
    args = [*ARGS[:3], "-m", *ARGS[3:], "simulation.seed=0,1", "simulation.rounds=1000", "simulation.checkpoint_every=50",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    # the first job's first checkpoint (round 50 of 1,000) says it trains; a busy client actor would not do:
    # the driver's node serves every round until the actor is ready, which on a busy machine took a whole job
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(sweep.glob("0_*/checkpoint/round_*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    [line] = [x for x in err.splitlines() if x.startswith("stopped by")]
    assert line.endswith(f"the same command with hydra.sweep.dir={sweep} resumes the sweep"), line
    assert [p.name.split("_")[0] for p in sweep.iterdir() if p.is_dir()] == ["0"]  # the sweep ended with its first job
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resuming from round" in again.stdout + again.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name[:2] for p in jobs] == ["0_", "1_"] and "seed=1" in jobs[1].name  # named by overrides
    assert all(len(json.loads((j / "results.json").read_text())["rounds"]) == 1000 for j in jobs)
    third = subprocess.run(args, capture_output=True, text=True, timeout=300)
    out = third.stdout + third.stderr
    assert third.returncode == 0 and out.count("not run again") == 2 and "Ray:" not in out, out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def test_two_node_ray_cluster_runs_clients_on_both_nodes_with_local_numbers(tmp_path):
    """``ray start --head`` plus a second ``ray start --address`` node on this machine, one CPU each;
    a run with ``simulation.ray_address`` places a client actor on each node and gives the numbers of a
    run on a private local instance. Only this cluster's processes are stopped (by pid: every process
    of it names its own temp dir)."""
    import tempfile

    port = _free_port()
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay under 107 bytes
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start", "--num-cpus=1", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1"]
    env = {**os.environ, "RAY_enable_worker_prestart": "0"}
    try:
        subprocess.run([*ray_cli, "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"],
                       check=True, capture_output=True, env=env, timeout=120)
        subprocess.run([*ray_cli, f"--address=127.0.0.1:{port}"], check=True, capture_output=True, env=env, timeout=120)
        args = [*ARGS, "simulation.rounds=3", "simulation.num_nodes=2"]
        joined = subprocess.run([*args, f"simulation.ray_address=127.0.0.1:{port}", f"hydra.run.dir={tmp_path / 'cluster'}"],
                                capture_output=True, text=True, timeout=300)
        assert joined.returncode == 0, joined.stderr
        assert f"Ray: joined the cluster at 127.0.0.1:{port} (2 nodes, 2 CPUs)" in joined.stdout + joined.stderr
        probe = ("import ray, json; ray.init(address='127.0.0.1:%d', logging_level='ERROR'); "
                 "from ray._private.state import actors; "
                 "print(json.dumps(sorted({a['Address']['NodeID'] for a in actors().values() "
                 "if a['ActorClassName'].endswith('ClientAppActor')})))" % port)
        nodes = json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                                          timeout=120).stdout.strip().splitlines()[-1])
        assert len(nodes) == 2  # a client actor ran on each node
    finally:
        for pid in set(_processes_mentioning(str(temp)) + _processes_mentioning(f":{port}")):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
    local = subprocess.run([*args, "simulation.ray_num_cpus=2", f"hydra.run.dir={tmp_path / 'local'}"],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr
    assert "Ray: a private local instance (2 CPUs)" in local.stdout + local.stderr
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cluster", "local"))
    assert [r["train_loss"] for r in a["rounds"]] == [r["train_loss"] for r in b["rounds"]]
    assert a["clients"] == b["clients"]


def test_a_client_that_raises_fails_its_rounds_and_the_run_goes_on(make_spec, tmp_path):
    from octomil_sim.runner import run

    results = run(make_spec("strategy=fedavg", "strategy.client._target_=fault_clients.FlakyClient",
                           "+strategy.client.every=3", "simulation.num_clients=6", "simulation.clients_per_round=6",
                           "simulation.rounds=4", "simulation.fraction_evaluate=0", "simulation.checkpoint_every=0"),
                  tmp_path)
    # every round, the clients with (id + round) % 3 == 0 raise: 2 of the 6 clients
    assert [r["failed_clients"] for r in results["rounds"]] == [2, 2, 2, 2]
    assert results["system"]["failed_rounds"] == 8
    assert results["system"]["last_failure_reason"]["0"] == "RuntimeError: flaky client 0 in round 3"
    assert len(results["clients"]) == 6 and results["final"]["global_acc"] > 0


def test_a_killed_client_actor_fails_its_clients_for_that_round_and_the_run_goes_on(tmp_path):
    """kill -9 of one of the run's own ClientAppActor processes mid-run (found among the run's
    descendants only): the run finishes every round and reports the clients it lost. 2,000 rounds: the
    driver's node serves every round until the actor is ready (``local_ray.EarlyActors``), and on a busy
    machine the actor took 19 s to be ready, longer than a 400-round run (no busy actor was found)."""
    args = [*ARGS, "simulation.rounds=2000", "simulation.num_clients=10", "simulation.checkpoint_every=0"]
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([*args, f"hydra.run.dir={run_dir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    actor, deadline = None, time.time() + 240
    while actor is None and time.time() < deadline and proc.poll() is None:
        for pid in descendants(proc.pid):
            try:
                if (Path(f"/proc/{pid}/cmdline").read_bytes()).startswith(b"ray::ClientAppActor.run"):
                    actor = pid
                    break
            except OSError:
                pass
        time.sleep(0.02)
    assert actor is not None, proc.communicate()
    os.kill(actor, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    results = json.loads((run_dir / "results.json").read_text())
    assert len(results["rounds"]) == 2000
    assert sum(r["failed_clients"] for r in results["rounds"]) > 0  # the round it was in lost its clients
    # and only that round: the dead actor left the pool, and the driver's node serves its share since
    assert sum(r["failed_clients"] > 0 for r in results["rounds"]) == 1, [r["failed_clients"] for r in results["rounds"]]
    assert "actor died" in " ".join(results["system"]["last_failure_reason"].values()).lower()


def test_a_normal_run_says_each_thing_once(tmp_path):
    """digits at Dirichlet 0.1 (flwr-datasets redraws the split 5 times for seed 0): one summary line
    for the redraws, the Ray line, the result line, and nothing twice or from every actor."""
    proc = subprocess.run([sys.executable, "-m", "octomil_sim", "strategy=fedavg", "dataset=digits", "partition=dirichlet",
                           "partition.alpha=0.1", "model=mlp", "simulation.num_clients=20", "simulation.rounds=2",
                           "simulation.fraction_evaluate=0", "progress=false", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, timeout=300,
                          # a cache of its own, so the data is partitioned here: a run that finds the clients
                          # file of an earlier run with the same data partitions nothing and draws nothing
                          env={**os.environ, "OCTOMIL_SIM_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    lines = [line.split("] - ", 1)[-1] for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == len(set(lines)), lines
    assert sum("drew the Dirichlet partition 5 more time(s)" in line for line in lines) == 1, lines
    assert not any(word in line for line in lines for word in ("WARNING", "Manually terminating",
                                                               "Generating partition_id_to_indices")), lines
    assert len(lines) == 3, lines
