"""dtrak_core.bench: the featurization benchmark and its `bench` command."""

import json

from dtrak_core.bench import bench_featurize, cmd_bench
from dtrak_core.cli import build_parser, main


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


def test_bench_command_runs_through_the_top_level_cli(model_dir, image_folder, tmp_path, capsys):
    # `python -m dtrak_core bench` is registered by dtrak_core.cli from dtrak_core.bench itself.
    code = main(["bench", "--model", str(model_dir), "--data", str(image_folder), "--num-samples", "2",
                 "--batch-size", "2", "-K", "2", "-k", "64", "--projectors", "sjlt", "--repeats", "1",
                 "--device", "cpu", "--out-dir", str(tmp_path), "--name", "cli"])
    assert code == 0
    assert capsys.readouterr().out.strip() == f"benchmark written to {tmp_path / 'cli.md'}"
    data = json.loads((tmp_path / "cli.json").read_text())
    assert (data["num_samples"], data["num_timesteps"], data["projection_dim"]) == (2, 2, 64)
    assert [s for s in (row["stage"] for row in data["rows"]) if s.startswith("projection")] == [
        f"projection sjlt p={data['num_parameters']} -> k=64"]


def test_bench_command_bad_input_is_one_line(image_folder, tmp_path, capsys):
    code = main(["bench", "--model", str(tmp_path / "none"), "--data", str(image_folder)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"error: model folder {tmp_path / 'none'} does not exist"


def test_bench_parser_keeps_its_options_and_defaults():
    args = build_parser().parse_args(["bench", "--model", "m", "--data", "d"])
    assert args.func is cmd_bench
    assert (args.num_samples, args.batch_size, args.num_timesteps, args.projection_dim, args.repeats) == (32, 16, 10,
                                                                                                          2048, 3)
    assert args.projectors == ["sjlt", "rademacher"] and args.device == "auto"
    assert args.out_dir is None and args.name is None
