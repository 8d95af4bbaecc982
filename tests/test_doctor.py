import json

import pytest

from tests.harness import run_cli


def _doctor(tmp_path, *args, **env):
    return run_cli(["-m", "launch", "doctor", *args], cwd=tmp_path, timeout=90, CUDA_VISIBLE_DEVICES="", **env)


@pytest.mark.timeout(120)
def test_doctor_human_and_json_with_a_passing_self_test(tmp_path):
    done = _doctor(tmp_path, "--master-addr", "127.0.0.1", "--nproc", "2")
    assert done.returncode == 0, done.stderr
    assert "environment: single process" in done.stdout
    assert "backend (auto): gloo; device: cpu" in done.stdout
    assert "route to 127.0.0.1: 127.0.0.1 via lo" in done.stdout and "interface lo: 127.0.0.1" in done.stdout
    assert "self-test gloo all_reduce on 2 local ranks: ok" in done.stdout
    done = _doctor(tmp_path, "--json", "--nproc", "2")
    assert done.returncode == 0, done.stderr  # scripts read the verdict from the exit code
    report = json.loads(done.stdout)
    assert report["environment"] == {"kind": "single process", "rank": 0, "local_rank": 0, "world_size": 1,
                                     "local_world_size": 1, "node_rank": 0, "master_addr": "127.0.0.1",
                                     "master_port": 29500, "distributed": False,
                                     "description": "single process (no launcher): rank 0/1"}
    assert report["selftest"][0]["backend"] == "gloo" and report["selftest"][0]["ok"] is True
    assert report["cpu"]["usable"] >= 1 and report["memory"]["total_mib"] > 0 and "lo" in report["network"]["interfaces"]
    assert report["versions"]["torch"] and report["versions"]["gloo"] is True


TORCHRUN = dict(RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", LOCAL_WORLD_SIZE="2", GROUP_RANK="1",
                MASTER_ADDR="10.0.0.1", MASTER_PORT="29400")


@pytest.mark.parametrize("variables, expected", [
    (TORCHRUN, ("torchrun", 3, 1, 4, 2, 1, "10.0.0.1", 29400)),
    (dict(SLURM_PROCID="1", SLURM_NTASKS="2", SLURM_LOCALID="1", SLURM_TASKS_PER_NODE="2",
          SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_ID="4242"), ("Slurm", 1, 1, 2, 2, 0, "gpu07", 19242)),
    (dict(MASTER_IP="10.0.0.1", RANK="1", WORLD_SIZE="2"), ("manual", 1, 0, 2, 1, 1, "10.0.0.1", 29500)),
    # item 6: older torch.distributed.launch (no LOCAL_WORLD_SIZE) joins with the stated ranks
    (dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29501"),
     ("manual", 1, 1, 2, 2, 0, "127.0.0.1", 29501)),
    ({}, ("single process", 0, 0, 1, 1, 0, "127.0.0.1", 29500)),
])
def test_doctor_detects_each_launchers_variables(tmp_path, variables, expected):
    done = _doctor(tmp_path, "--json", "--no-selftest", **variables)
    assert done.returncode == 0, done.stderr
    env = json.loads(done.stdout)["environment"]
    keys = ("kind", "rank", "local_rank", "world_size", "local_world_size", "node_rank", "master_addr", "master_port")
    assert tuple(env[k] for k in keys) == expected


@pytest.mark.parametrize("variables, message", [
    (dict(SLURM_PROCID="3", SLURM_NTASKS="2"), "rank 3 is outside world size 2"),
    (dict(RANK="1", WORLD_SIZE="2"), "neither MASTER_ADDR nor MASTER_IP is"),
])
def test_doctor_reports_bad_variables_in_one_line(tmp_path, variables, message):
    done = _doctor(tmp_path, "--no-selftest", **variables)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr


def test_a_forgotten_master_export_refuses_instead_of_training_alone(tmp_path):
    done = run_cli(["-m", "ddp.train", "train.epochs=1"], cwd=tmp_path, timeout=60, RANK="1", WORLD_SIZE="2")
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("error:") == 1 and "MASTER_ADDR" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_doctor_fails_when_the_master_address_does_not_resolve(tmp_path):
    done = _doctor(tmp_path, "--no-selftest", "--master-addr", "bad..host")
    assert done.returncode == 1, done.stderr
    assert "route to bad..host: the master address 'bad..host' does not resolve" in done.stdout
    done = _doctor(tmp_path, "--json", "--no-selftest", "--master-addr", "bad..host")
    assert done.returncode == 1, done.stderr  # --json fails the same way, with the reason in the report
    assert "the master address 'bad..host' does not resolve" in json.loads(done.stdout)["network"]["route"]["error"]
