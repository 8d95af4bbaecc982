from tests.harness import run_cli


def test_doctor_single_process(tmp_path):
    done = run_cli(["-m", "launch", "doctor"], cwd=tmp_path, timeout=60, CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 0, done.stderr
    assert "environment: single process" in done.stdout
    assert "backend (auto): gloo; device: cpu" in done.stdout


def test_doctor_reads_slurm_variables(tmp_path):
    done = run_cli(["-m", "launch", "doctor"], cwd=tmp_path, timeout=60, SLURM_PROCID="1", SLURM_NTASKS="2",
                   SLURM_LOCALID="1", SLURM_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="gpu[07-08]",
                   SLURM_JOB_ID="4242")
    assert done.returncode == 0, done.stderr
    assert "Slurm: rank 1/2, local rank 1/2, node 0, rendezvous tcp://gpu07:19242" in done.stdout


def test_doctor_reports_bad_variables_in_one_line(tmp_path):
    done = run_cli(["-m", "launch", "doctor"], cwd=tmp_path, timeout=60, SLURM_PROCID="3", SLURM_NTASKS="2")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "rank 3 is outside world size 2" in done.stderr
