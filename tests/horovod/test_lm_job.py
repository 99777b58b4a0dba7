"""The language-model main job (``--job lm``) under horovodrun, on a tiny model for a few steps:
Horovod's stock allreduce with hvdquant DQSG and hvdquant.DistributedOptimizer's allgather with
QSGD; replicas end bit-identical, evaluations are recorded, and the bits handed are measured."""

import math

import horovod.torch as hvd
import pytest

from hvdquant.examples import train

pytestmark = pytest.mark.horovod
TINY = ["--job", "lm", "--steps", "6", "--eval-every", "3", "--layers", "1", "--width", "32", "--heads", "2",
        "--context", "32", "--eval-windows", "8", "--batch-size", "4"]


@pytest.mark.parametrize("flags, bits_below", [(["--compression", "dqsg"], 8.0),
                                               (["--compression", "qsgd", "--reducer", "allgather"], 8.0),
                                               (["--compression", "none"], 32.1)])
def test_lm_job_trains_with_identical_replicas(tmp_path, flags, bits_below):
    summary = train.main(TINY + flags + ["--out", str(tmp_path)])
    assert summary["replicas_bit_identical"] and summary["ranks"] == hvd.size() and summary["job"] == "lm"
    assert [h["step"] for h in summary["history"]] == [3, 6]
    assert all(0.0 < h["validation_loss"] < math.log(256) + 0.5 for h in summary["history"])
    assert 0.0 < summary["bits_per_coordinate"] < bits_below
    if hvd.rank() == 0:
        assert (tmp_path / f"train-{train.run_name(train.parse_args(TINY + flags))}.json").is_file()
