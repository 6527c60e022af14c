"""Rank, world size and master address from torchrun or SLURM variables."""

import pytest

from megatron_papo.parallel import ParallelConfig
from megatron_papo.parallel.launch_env import expand_nodelist, read_launch_env


def test_torchrun_wins_over_slurm():
    env = {
        "RANK": "3",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "1",
    }
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3,
        8,
        1,
        "h",
        1234,
        "torchrun",
    )


def test_slurm_variables():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "20123",
        "SLURM_JOB_NODELIST": "gpu[07-08],login",
    }
    e = read_launch_env(env)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (5, 16, 1, "gpu07", "slurm")
    assert e.master_port == 20000 + 20123 % 20000


def test_single_process_and_bad_values():
    assert read_launch_env({}).world_size == 1
    with pytest.raises(ValueError, match="RANK='x' is not an integer"):
        read_launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("n[9-10]") == ["n9", "n10"]
    with pytest.raises(ValueError, match="bad range"):
        expand_nodelist("n[5-2]")


def test_layout_must_divide_world():
    assert (
        ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2).data_parallel_size(8)
        == 2
    )
    with pytest.raises(ValueError, match="6"):
        ParallelConfig(tensor_model_parallel_size=4).data_parallel_size(6)
