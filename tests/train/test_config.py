"""FitConfig (validated settings of a fit, from keywords, mappings and TOML/JSON files), the run-folder
policy, and the data protocol fit accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyro_vits._rundir import CHECKPOINT, CONFIG, METRICS, RUN_FILES, check_out_dir
from pyro_vits.data.batch import FitData
from pyro_vits.models import PosteriorEncoder, VITSPriorModel, make_teacher, sample_dataset
from pyro_vits.train import FitConfig, fit

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("changes, message", [
    (dict(steps=0), "steps must be a positive int, got 0"),
    (dict(batch_size=0), "batch_size must be a positive int or None, got 0"),
    (dict(lr=0.0), "lr must be positive, got 0.0"),
    (dict(lr="big"), "lr must be a number, got 'big'"),
    (dict(lrd=1.5), r"lrd \(the learning rate's per-step decay factor\) must be in \(0, 1\], got 1.5"),
    (dict(nan_policy="ignore"), r"nan_policy must be one of \('stop', 'skip'\), got 'ignore'"),
    (dict(resume=True), "resume and checkpoint_every need out_dir"),
    (dict(out_dir="r", resume=True, overwrite=True), "resume=True continues the run in out_dir"),
    (dict(seed=1.5), "seed must be an int, got 1.5"),
])
def test_invalid_settings_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        FitConfig(**dict(dict(steps=3), **changes))


def test_from_mapping_and_files(tmp_path):
    cfg = FitConfig.from_mapping({"steps": 5, "batch-size": 4, "out_dir": str(tmp_path)})
    assert (cfg.steps, cfg.batch_size, cfg.out_dir) == (5, 4, tmp_path)
    with pytest.raises(ValueError, match=r"config: unknown fit setting\(s\) \['stepz'\]"):
        FitConfig.from_mapping({"stepz": 5})
    (tmp_path / "fit.toml").write_text("steps = 7\nlr = 0.01\nnan_policy = 'skip'\n")
    assert FitConfig.from_file(tmp_path / "fit.toml") == FitConfig(steps=7, lr=0.01, nan_policy="skip")
    (tmp_path / "fit.json").write_text(json.dumps({"steps": 2, "checkpoint_every": 1, "out_dir": "r"}))
    assert FitConfig.from_file(tmp_path / "fit.json").out_dir == Path("r")
    with pytest.raises(ValueError, match="must end in .toml or .json"):
        FitConfig.from_file(tmp_path / "fit.yaml")


def test_fit_runs_a_config_and_records_it(tmp_path):
    teacher = make_teacher(4, 8, 3, n_layers=1, n_flows=2, seed=0)
    data = sample_dataset(teacher, 8, 8, seed=1)
    assert isinstance(data, FitData) and data.describe()["n"] == 8
    cfg = FitConfig(steps=2, batch_size=4, out_dir=tmp_path / "run", log_every=1, eval_samples=2,
                    progress=False)
    model, guide = VITSPriorModel(4, 8, 3, n_layers=1, n_flows=2), PosteriorEncoder(4, 4, 8, 3, n_layers=1)
    result = fit(model, guide, data, cfg, device="cpu")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(RUN_FILES)
    saved = json.loads((tmp_path / "run" / CONFIG).read_text())
    assert saved == json.loads(json.dumps(result.config)) and saved["batch_size"] == 4
    assert len((tmp_path / "run" / METRICS).read_text().splitlines()) == 2
    with pytest.raises(FileExistsError, match="is not empty"):
        check_out_dir(tmp_path / "run", overwrite=False)
    check_out_dir(tmp_path / "run", overwrite=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        check_out_dir(tmp_path / "file", overwrite=True)
    assert (tmp_path / "run" / CHECKPOINT).is_file()


def test_fit_names_what_it_needs_of_data():
    model, guide = VITSPriorModel(4, 8, 3, n_layers=1, n_flows=2), PosteriorEncoder(4, 4, 8, 3, n_layers=1)
    with pytest.raises(TypeError, match="data must be a pyro_vits Batch .*FitData.*got list"):
        fit(model, guide, [1, 2], FitConfig(steps=1))
