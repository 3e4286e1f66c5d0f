import json

from dtrak_core.bench import bench_featurize


def test_bench_writes_json_and_markdown(model_dir, image_folder, tmp_path):
    report = bench_featurize(model_dir, image_folder, num_samples=4, batch_size=2, num_timesteps=2,
                             projection_dim=128, projectors=("sjlt", "rademacher"), repeats=1,
                             device="cpu", out_dir=tmp_path, name="tiny", command="pytest")
    data = json.loads((tmp_path / "tiny.json").read_text())
    markdown = (tmp_path / "tiny.md").read_text()
    stages = [row["stage"] for row in data["rows"]]
    assert stages[0].startswith("training step")
    assert any("projection sjlt" in s for s in stages) and any("projection rademacher" in s for s in stages)
    assert any("one new target" in s for s in stages)
    for row in data["rows"]:
        assert row["process_peak_rss_mb"] > 0
        assert row.get("seconds_per_sample", row.get("seconds_total")) > 0
    assert data["rows"][0]["x_training_step"] == 1.0
    assert data["machine"]["device"] == "cpu" and data["command"] == "pytest"
    assert "| stage |" in markdown and "pytest" in markdown
    assert report["num_parameters"] == data["num_parameters"] > 0
