"""The SLURM path for real: a one-node cluster on this machine runs a sweep through ``hydra/launcher=slurm``.

The cluster is Debian's ``slurm-wlm`` and ``munge`` (installed with apt-get when missing: root and a package
registry needed, else the test skips and says why), with everything private to the test: its own munge key and
socket, ``slurm.conf`` (``SLURM_CONF``), state, spool, logs and ports, so the machine's own SLURM or munge, if
any, is neither used nor changed. ``slurmctld -c`` and ``slurmd -c`` start from a clean state;
``select/cons_tres``, ``proctrack/linuxproc``, ``task/none``, no accounting (``sacct`` fails, as on many small
clusters). The node declares 4 CPUs whatever the machine has (``SlurmdParameters=config_overrides``), so the
sweep's two jobs of two tasks run at once and rendezvous on one host.

The sweep: two budgets, two tasks per job (gloo DDP across the SLURM tasks), every stage including a fine-tune
of 2 updates, a path-valued override. Every run's report must say it met its budget on 2 processes; then the
daemons the test started are stopped by their process ids.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pruning import artifacts

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["slurm-wlm", "munge"]
PROGRAMS = ["slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel", "srun", "munged"]


def _program(name: str) -> str | None:
    """The path of ``name`` (daemons live in /usr/sbin, which a user's PATH may lack)."""
    sbin = f"/usr/sbin/{name}"
    return shutil.which(name) or (sbin if os.access(sbin, os.X_OK) else None)


def _missing() -> list[str]:
    return [p for p in PROGRAMS if _program(p) is None]


def _tail(path: Path, chars: int = 1500) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path.name}: not written)"


@pytest.fixture(scope="module")
def slurm_programs():
    """Installs slurm-wlm and munge with apt-get when missing (once), services not started; skips when that
    cannot be done here."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs hydra-submitit-launcher "
                        "(pip install -e \".[dev]\")")
    if not _missing():
        return
    if os.geteuid() != 0:
        pytest.skip(f"SLURM is not installed ({', '.join(_missing())} missing) and installing it needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("SLURM is not installed and there is no apt-get to install slurm-wlm and munge")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    policy = Path("/usr/sbin/policy-rc.d")  # Debian's switch: packages do not start their services
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        apt = ["apt-get", "-qq", "-o", "DPkg::Lock::Timeout=120"]  # waits for another apt run to end
        for cmd in ([*apt, "update"], [*apt, "install", "-y", "--no-install-recommends", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                pytest.skip(f"could not install SLURM ({' '.join(cmd)} exited {proc.returncode}): "
                            f"{(proc.stderr or proc.stdout)[-600:]}")
    finally:
        if ours:
            policy.unlink()
    if _missing():
        pytest.skip(f"apt-get installed {PACKAGES} but {_missing()} are still missing")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


SLURM_CONF = """\
ClusterName=kptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs=4 RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=30 State=UP
"""


class Cluster:
    """The daemons of a private one-node cluster, each started (in the foreground) and stopped by its pid."""

    def __init__(self, root: Path) -> None:
        self.root, self.procs = root, {}
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen([_program(name), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.root)
        return self.procs[name]

    def squeue(self) -> list[str]:
        proc = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=self.env, capture_output=True, text=True, timeout=30)
        return proc.stdout.split("\n")[:-1] if proc.returncode == 0 else [f"squeue failed: {proc.stderr}"]

    def wait(self, ready, what: str, timeout: float) -> None:
        """Wait until ``ready()``; skip, with the daemons' logs, when a daemon exits or time runs out."""
        end = time.time() + timeout
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > end:
                logs = "\n".join(f"--- {n}\n{_tail(self.root / f'{n}.out', 600)}" for n in self.procs)
                pytest.skip(f"the one-node SLURM cluster did not come up ({what}; exited: {dead}):\n{logs}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel what is still queued, then stop every daemon this test started, by its pid, and any job process
        the cancel left behind (with ``proctrack/linuxproc``, a step outlives a stopped slurmd)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            jobs = [line.split()[0] for line in self.squeue() if line and not line.startswith("squeue")]
            if jobs:
                subprocess.run(["scancel", *jobs], env=self.env, capture_output=True, timeout=30)
                end = time.time() + 20
                while self.squeue() and time.time() < end:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()  # SIGTERM to this pid
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for pid in self._job_processes():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def _job_processes(self) -> list[int]:
        """Processes started under this cluster (their environment names its slurm.conf), this one excepted."""
        marker, pids = f"SLURM_CONF={self.env['SLURM_CONF']}\0".encode(), []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (entry / "environ").read_bytes():
                        pids.append(int(entry.name))
        return pids


@pytest.fixture(scope="module")
def cluster(slurm_programs):
    if os.geteuid() != 0:
        pytest.skip("a SLURM node daemon (slurmd) starts jobs as their users: the test cluster needs root")
    # munged insists that every folder on the way to its socket can be searched by everyone
    root = Path(tempfile.mkdtemp(prefix="kp-slurm-", dir="/tmp"))
    root.chmod(0o755)
    cluster = Cluster(root)
    try:
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        cluster.start("munged", "--foreground", f"--socket={root}/munge.socket", f"--key-file={key}",
                      f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid", f"--seed-file={root}/munged.seed")
        cluster.wait(lambda: (root / "munge.socket").exists(), "munged's socket", 15)
        (root / "state").mkdir()
        (root / "spool").mkdir()
        ctld_port, d_port = _free_ports(2)
        host = socket.gethostname().split(".")[0]
        (root / "slurm.conf").write_text(SLURM_CONF.format(host=host, dir=root, ctld_port=ctld_port, d_port=d_port))
        cluster.start("slurmctld", "-D", "-c", "-f", str(root / "slurm.conf"))  # -c: a clean state
        cluster.start("slurmd", "-D", "-c", "-f", str(root / "slurm.conf"), "-N", host)

        def idle() -> bool:
            proc = subprocess.run(["sinfo", "-h", "-o", "%T"], env=cluster.env, capture_output=True, text=True)
            return proc.stdout.strip() == "idle"

        cluster.wait(idle, "node idle", 30)
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.timeout(900)  # the first run may install SLURM with apt-get; the sweep itself takes about a minute
def test_a_two_budget_sweep_fine_tunes_under_ddp_across_slurm_tasks(cluster, tmp_path):
    from test_distill_helpers import write_images

    from pruning.summarize import main as summarize

    train = write_images(str(tmp_path / "images" / "train"), per_class=8)
    val = write_images(str(tmp_path / "images" / "val-folder"), per_class=2, seed=1)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "pruning.run", "-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}",
           # the cluster's settings: partition, tasks (one process each) and CPUs per node, memory, no GPUs
           "hydra.launcher.partition=debug", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
           "hydra.launcher.mem_gb=1", "hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=10",
           "model.name=resnet18", "model.img_size=32", "model.pretrained=false", "importance=l1", "logger=none",
           f"paths.cache_dir={tmp_path / 'cache'}", f"data.root={train}", f"data.val_root={val}", "data.workers=0",
           "trainer.epochs=1", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.warmup_epochs=0",
           "trainer.amp=null", "trainer.channels_last=false", "trainer.log_every=1", "budget.target=0.5,0.7"]
    env = {**cluster.env, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # without accounting the launcher's status checks guess: it may return before the last job has ended
    end = time.time() + 120
    while cluster.squeue() and time.time() < end:
        time.sleep(1)
    assert cluster.squeue() == [], "jobs still queued or running after 2 minutes"
    elapsed = time.time() - start

    logs = "\n".join(f"--- {p.relative_to(sweep)}\n{_tail(p)}" for p in sorted(sweep.glob(".submitit/*/*_log.err")))
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(runs) == 2, logs  # one directory per run, one level deep, the path value included
    assert all(r.name.startswith(f"{i}_budget.target=0.{5 + 2 * i},") and ",data.val_root=val-folder~" in r.name
               for i, r in enumerate(runs)), [r.name for r in runs]
    for run, target in zip(runs, (0.5, 0.7)):
        assert (run / artifacts.REPORT).is_file(), logs
        report = artifacts.read_json(str(run / artifacts.REPORT))
        assert report["run"]["distributed"] == {"processes": 2, "backend": "gloo", "device": "cpu"}
        limit = next(c["limit"] for c in report["budget"]["constraints"] if c["cost"] == "macs")
        assert report["model"]["macs_after"] <= limit and report["model"]["achieved_over_target"] >= 0.99
        assert report["budget"]["spec"] == str(target)
        assert report["finetune"]["steps"] == 2 and report["validate"]["student"]["top1"] >= 0
    assert summarize([str(sweep)]) == 0
    assert (sweep / "summary.md").read_text().startswith("All 2 runs finished.")
    print(f"SLURM sweep: {elapsed:.0f} s from submission to both jobs done")
