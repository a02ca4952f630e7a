"""An output folder written by an older version of the row-making code refuses to resume, saying why."""
import json

import pytest

from pipeline.config import ROWS_VERSION, JobConfig, config_hash, content_config
from pipeline.output import Layout, claim_output


def _config(tmp_path, **kw):
    return JobConfig.from_dict({"source": {"paths": ["x.parquet"]}, "output": str(tmp_path), **kw})


def test_the_rows_version_is_hashed_and_recorded(tmp_path):
    config = _config(tmp_path)
    assert content_config(config)["rows_version"] == ROWS_VERSION
    claim_output(Layout(str(tmp_path)), config, config_hash(config))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rows_version"] == ROWS_VERSION and written["config_hash"] == config_hash(config)
    claim_output(Layout(str(tmp_path)), config, config_hash(config))   # the same code resumes
    assert config_hash(JobConfig.from_dict(written)) == config_hash(config)  # an output's config.json replays


def test_an_output_of_older_rows_is_refused_with_the_reason_and_replaced_on_overwrite(tmp_path):
    config = _config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"config_hash": "0123456789abcdef"}))  # no version: version 1
    with pytest.raises(ValueError, match=f"older version of this code \\(rows version 1, now {ROWS_VERSION}\\)"):
        claim_output(Layout(str(tmp_path)), config, config_hash(config))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "old.parquet").write_bytes(b"x")
    claim_output(Layout(str(tmp_path)), _config(tmp_path, overwrite=True), config_hash(config))
    assert not (tmp_path / "shards" / "old.parquet").exists()
    assert json.loads((tmp_path / "config.json").read_text())["rows_version"] == ROWS_VERSION
