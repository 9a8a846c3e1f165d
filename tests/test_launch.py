"""launch/*.sh: the dry-run prints exactly the commands a real run executes, and bad flags fail clearly.

A real run is made against stub `gcloud` and `tar` executables that record their arguments, so the
printed lines (parsed as a shell would) are compared with what would reach gcloud. Remote commands
are syntax-checked with `bash -n`.
"""

import json
import os
import re
import shlex
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/smollm2-135m.yaml"
TPU = ["--name", "bebop-v5p", "--zone", "us-east5-a"]
RUN = TPU + ["--stage", "generate", "--config", CONFIG, "--bucket", "gs://my-bucket/runs", "--run-name", "try1"]


def launch(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=30, env=env)


def dry_run(script: str, *args: str) -> list[list[str]]:
    """The commands printed by `script --dry-run`, each split into its arguments."""
    proc = launch(script, "--dry-run", *args)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def recorded_run(tmp_path, script: str, *args: str) -> list[list[str]]:
    """The commands `script` executes for real, with gcloud and tar replaced by recorders."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("gcloud", "tar"):
        stub = bin_dir / tool
        stub.write_text("#!/usr/bin/env python3\nimport json, os, sys\n"
                        "with open(os.environ['CALLS'], 'a') as f:\n"
                        f"    f.write(json.dumps(['{tool}'] + sys.argv[1:]) + '\\n')\n")
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(calls))
    proc = launch(script, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()]


def remote_command(cmd: list[str]) -> str:
    (arg,) = [a for a in cmd if a.startswith("--command=")]
    return arg.removeprefix("--command=")


def assert_valid_bash(script: str) -> None:
    proc = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_create_tpu_vm_and_queued_resource():
    assert dry_run("create.sh", *TPU, "--accelerator-type", "v5p-64") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "bebop-v5p", "--zone=us-east5-a",
         "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5"]]
    assert dry_run("create.sh", "--name=bebop-v6e", "--zone=us-east1-d", "--project=my-proj",
                   "--accelerator-type=v6e-16", "--queued", "--spot") == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "bebop-v6e", "--node-id=bebop-v6e",
         "--zone=us-east1-d", "--project=my-proj", "--accelerator-type=v6e-16",
         "--runtime-version=v2-alpha-tpuv6e", "--spot"]]


@pytest.mark.parametrize("accelerator,version", [("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                                 ("v4-32", "tpu-ubuntu2204-base")])
def test_create_picks_the_runtime_for_the_tpu_generation(accelerator, version):
    (cmd,) = dry_run("create.sh", *TPU, "--accelerator-type", accelerator)
    assert f"--version={version}" in cmd
    (cmd,) = dry_run("create.sh", *TPU, "--accelerator-type", accelerator, "--version", "my-runtime")
    assert "--version=my-runtime" in cmd


def test_setup_installs_on_all_workers(tmp_path):
    tar, scp, ssh = dry_run("setup.sh", *TPU)
    assert tar[:2] == ["tar", "-czf"] and "--exclude=.venv" in tar and tar[-1] == "."
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[6] == "bebop-v5p:bebop-jax.tar.gz"
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bebop-v5p"]
    assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
    remote = remote_command(ssh)
    assert "uv venv --allow-existing --python 3.12 ~/bebop-venv" in remote
    assert 'pip install --python ~/bebop-venv/bin/python -e ~/bebop-jax "jax[tpu]"' in remote
    assert_valid_bash(remote)
    assert recorded_run(tmp_path, "setup.sh", *TPU) == [tar, scp, ssh]


def test_run_stage_on_all_workers_with_logs_in_the_bucket(tmp_path):
    copy, ssh = dry_run("run.sh", *RUN, "generate.max_new_tokens=16", "rl.run_dir=gs://my-bucket/runs/try1")
    assert copy == ["gcloud", "storage", "cp", CONFIG, "gs://my-bucket/runs/try1/config.yaml"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "bebop-v5p"] and "--worker=all" in ssh
    remote = remote_command(ssh)
    assert ('~/bebop-venv/bin/bebop generate --config ~/bebop-runs/try1/config.yaml "generate.max_new_tokens=16" '
            '"rl.run_dir=gs://my-bucket/runs/try1" 2>&1 | tee $LOG') in remote
    assert "LOG=~/bebop-runs/try1/$(hostname).log" in remote
    assert "gcloud storage cp $LOG gs://my-bucket/runs/try1/logs/; exit $rc" in remote
    assert_valid_bash(remote)
    assert recorded_run(tmp_path, "run.sh", *RUN, "generate.max_new_tokens=16",
                        "rl.run_dir=gs://my-bucket/runs/try1") == [copy, ssh]


def test_run_detached_and_default_run_name():
    copy, ssh = dry_run("run.sh", *RUN[:-2], "--detach", "--", "generate.temperature=0.7")
    assert re.fullmatch(r"gs://my-bucket/runs/generate-\d{8}-\d{6}/config.yaml", copy[-1])
    remote = remote_command(ssh)
    assert remote.startswith('(trap "" HUP; ') and remote.endswith(") </dev/null >/dev/null 2>&1 &")
    assert_valid_bash(remote)


def test_delete_tpu_vm_and_queued_resource():
    assert dry_run("delete.sh", *TPU) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "bebop-v5p", "--zone=us-east5-a", "--quiet"]]
    assert dry_run("delete.sh", *TPU, "--queued") == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "bebop-v5p", "--zone=us-east5-a", "--force",
         "--quiet"]]


@pytest.mark.parametrize("script,args,message", [
    ("create.sh", ["--zone", "z", "--accelerator-type", "v5p-8"], "missing required flag --name"),
    ("create.sh", TPU + ["--accelerator-type"], "--accelerator-type needs a value"),
    ("create.sh", TPU + ["--accelerator-type", "tpu9-8"], "no default --version for accelerator type 'tpu9-8'"),
    ("create.sh", TPU + ["--accelerator-type", "v5p-8", "--workers", "4"], "unknown argument '--workers'"),
    ("create.sh", ["--name", "Bebop_1", "--zone", "z", "--accelerator-type", "v5p-8"], "--name 'Bebop_1'"),
    ("setup.sh", TPU + ["--source", "/nonexistent"], "--source '/nonexistent' is not a bebop-jax checkout"),
    ("delete.sh", ["--name", "x"], "missing required flag --zone"),
    ("run.sh", TPU + ["--stage", "train", "--config", CONFIG, "--bucket", "gs://bkt"], "--stage 'train' is not one of"),
    ("run.sh", TPU + ["--stage", "rl", "--config", "no.yaml", "--bucket", "gs://bkt"], "--config 'no.yaml' is not a file"),
    ("run.sh", TPU + ["--stage", "rl", "--config", CONFIG, "--bucket", "s3://bkt"], "--bucket 's3://bkt'"),
    ("run.sh", TPU + ["--stage", "rl", "--config", CONFIG], "missing required flag --bucket"),
    ("run.sh", RUN + ["rl.steps=$(reboot)"], "override 'rl.steps=$(reboot)' is not section.key=value"),
    ("run.sh", RUN + ["steps"], "override 'steps' is not section.key=value"),
])
def test_bad_flags_fail_with_a_clear_error(script, args, message):
    proc = launch(script, *args, "--dry-run")
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"error: {message}" in proc.stderr


@pytest.mark.parametrize("stage", ["generate", "export", "sample-data", "pretrain-mtp", "eval-acceptance", "rl",
                                   "plan", "demo"])
def test_every_stage_runs_on_every_worker(stage):
    args = TPU + ["--stage", stage, "--config", CONFIG, "--bucket", "gs://my-bucket/runs", "--run-name", "s1"]
    _, ssh = dry_run("run.sh", *args, "rl.steps=2")
    remote = remote_command(ssh)
    assert "--worker=all" in ssh
    assert f'~/bebop-venv/bin/bebop {stage} --config ~/bebop-runs/s1/config.yaml "rl.steps=2"' in remote
    assert_valid_bash(remote)
