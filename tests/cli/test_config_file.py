"""``--config FILE``: a YAML/JSON file of a command's options, overridden by the command line,
checked as the command line is (exit 2 naming the file and the key), and recorded with the
source of every value in ``RUN/settings.json`` and the exported folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixdq_jax import cli
from mixdq_jax.cli import config_file

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a red square"]


def _parse(argv: list[str]):
    return config_file.parse_args(cli.build_parser(), argv)


def _options(args) -> dict:
    """The namespace without the bookkeeping of where its values came from."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "_mixdq_settings")}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _refused(capsys, argv: list[str], *names: str) -> str:
    """``mixdq ARGV`` exits 2 at parse time (`mixdq_jax.cli.main`'s first step; parsed alone,
    so that a file wrongly accepted cannot start the command) with one message naming every
    ``names``."""
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mixdq {argv[0]}: error: ") and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    assert len(err.strip().splitlines()) <= 2, err
    return err


@pytest.fixture
def prompts(tmp_path) -> Path:
    return _write(tmp_path / "prompts.txt", "\n".join(PROMPTS) + "\n")


def test_a_file_with_dashes_and_underscores_is_the_command_line(tmp_path, prompts):
    """Parsed only: nothing runs in these tests but the last one."""
    config = _write(
        tmp_path / "recipe.yaml",
        f"""
model: testbed
target: W4A8
method: naive
run: {tmp_path / "run"}
prompts: {prompts}
num-calib: 3
num_select: 1
guidance_scale: 1.5
protect-top: 2.5
seed: 7
overwrite: true
recon_blocks: [down_blocks.0, mid_block]
eval-select: random
stop_after: weights
""",
    )
    from_file = _parse(["quantize", "--config", str(config)])
    from_cli = _parse([
        "quantize", "--model", "testbed", "--target", "W4A8", "--method", "naive",
        "--run", str(tmp_path / "run"), "--prompts", str(prompts), "--num-calib", "3",
        "--num-select", "1", "--guidance-scale", "1.5", "--protect-top", "2.5", "--seed", "7",
        "--overwrite", "--recon-blocks", "down_blocks.0", "mid_block", "--eval-select",
        "random", "--stop-after", "weights",
    ])  # fmt: skip
    assert _options(from_file) == _options(from_cli)
    assert from_file.num_calib == 3 and from_file.target.name == "W4A8"  # typed, not text
    # JSON too; required options (--target, --run) may come from the file alone
    as_json = _write(tmp_path / "recipe.json", json.dumps(
        {"target": "W4A8", "run": str(tmp_path / "run"), "num_calib": 3}))  # fmt: skip
    args = _parse(["quantize", "--config", str(as_json)])
    assert (args.target.name, args.run, args.num_calib) == ("W4A8", tmp_path / "run", 3)


def test_the_command_line_overrides_the_file(tmp_path, capsys):
    config = _write(
        tmp_path / "recipe.yaml",
        """
target: W4A8
run: runs/a
num-calib: 3
chunk: 4
recon-blocks: [down_blocks.0, mid_block]
""",
    )
    args = _parse(["quantize", "--config", str(config), "--num-calib", "5", "--recon-blocks",
                   "up_blocks.1", "--run", "runs/b"])  # fmt: skip
    assert (args.num_calib, args.chunk, args.run) == (5, 4, Path("runs/b"))
    assert args.recon_blocks == ["up_blocks.1"]  # the command line's list replaces the file's
    assert args.num_select == 4  # the default
    sources = config_file.settings_of(args).sources
    assert sources["num_calib"] == sources["recon_blocks"] == "command line"
    assert sources["chunk"] == sources["target"] == "file"
    assert sources["num_select"] == "default"
    # without --config the command line alone, and --target/--run required as before
    assert _parse(["quantize", "--target", "W8A8", "--run", "r"]).num_calib == 32
    _refused(capsys, ["quantize", "--run", "r"], "required", "--target")


def test_an_unknown_key_is_refused_with_a_suggestion(tmp_path, capsys):
    config = _write(tmp_path / "recipe.yaml", "target: W4A8\nrun: r\nnum-calbi: 2\n")
    _refused(capsys, ["quantize", "--config", str(config)],
             str(config), "'num-calbi'", "did you mean 'num-calib'")  # fmt: skip
    config = _write(tmp_path / "nothing.yaml", "target: W4A8\nrun: r\nzzz: 2\n")
    _refused(capsys, ["quantize", "--config", str(config)], str(config), "'zzz'", "--help")
    config = _write(tmp_path / "twice.yaml", "target: W4A8\nrun: r\nnum-calib: 2\nnum_calib: 3\n")
    _refused(capsys, ["quantize", "--config", str(config)], "'num-calib'", "'num_calib'")


@pytest.mark.parametrize(
    ("line", "names"),
    [
        ("num-calib: 0", ["num-calib", "must be >= 1, got 0"]),
        ("protect_top: 101", ["protect_top", "percentage", "[0, 100]"]),
        ("preset: best", ["preset", "'best'", "ours, paper, official"]),
        ("target: W9A8", ["target", "weight bits 9", "[2, 8]"]),
        ("seed: -1", ["seed", "-1"]),
        ("overwrite: 1", ["overwrite", "true or false"]),
        ("num-select: [1, 2]", ["num-select", "one value", "a list"]),
        ("scheduler: off", ["scheduler", "quote it"]),  # YAML reads off as false
        ("eval-num: 1.5", ["eval-num", "expected an integer", "'1.5'"]),
        ("recon-blocks: [a, [b]]", ["recon-blocks", "one value"]),
        ("prompts: no-such-file.txt", ["prompts", "no-such-file.txt", "no such file"]),
    ],
)
def test_a_bad_value_names_the_file_the_key_and_what_is_allowed(tmp_path, capsys, line, names):
    config = _write(tmp_path / "recipe.yaml", f"target: W4A8\nrun: {tmp_path}/r\n{line}\n")
    _refused(capsys, ["quantize", "--config", str(config)], str(config), *names)


def test_a_broken_config_file_is_named(tmp_path, capsys):
    argv = ["quantize", "--config"]
    _refused(capsys, [*argv, str(tmp_path / "none.yaml")], "none.yaml", "no such file")
    _refused(capsys, [*argv, str(tmp_path)], str(tmp_path), "a folder")
    bad = _write(tmp_path / "bad.yaml", "target: W4A8\nrecon-blocks: [a, b\n")
    _refused(capsys, [*argv, str(bad)], str(bad), "not valid YAML", "line")
    bad = _write(tmp_path / "bad.json", '{"target": "W4A8",}')
    _refused(capsys, [*argv, str(bad)], str(bad), "not valid JSON", "line 1")
    listed = _write(tmp_path / "list.yaml", "- target\n- W4A8\n")
    _refused(capsys, [*argv, str(listed)], str(listed), "expected a mapping", "a list")
    nested = _write(tmp_path / "nested.yaml", "config: other.yaml\n")
    _refused(capsys, [*argv, str(nested)], str(nested), "'config' cannot be set")


def test_paths_in_the_file_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "prompts.txt", "a\nb\n")
    config = _write(tmp_path / "configs" / "recipe.yaml",
                    "target: W4A8\nrun: runs/x\nprompts: prompts.txt\n")  # fmt: skip
    args = _parse(["quantize", "--config", "configs/recipe.yaml"])
    assert (args.run, args.prompts) == (Path("runs/x"), Path("prompts.txt"))
    assert config.is_file()


def test_the_run_settings_hold_every_value_its_source_and_the_earlier_runs(tmp_path):
    config = _write(tmp_path / "recipe.yaml", "target: W4A8\nrun: runs/a\nnum-calib: 3\n")
    run = tmp_path / "run"
    argv = ["quantize", "--config", str(config), "--chunk", "2"]
    first = _parse(argv)
    config_file.write_run_settings(run, first)
    written = json.loads((run / "settings.json").read_text())
    assert written["command"] == "quantize" and written["config"] == str(config)
    settings, sources = written["settings"], written["sources"]
    assert settings["num-calib"] == 3 and sources["num-calib"] == "file"
    assert settings["target"] == "W4A8" and settings["run"] == "runs/a"
    assert settings["chunk"] == 2 and sources["chunk"] == "command line"
    assert settings["num-select"] == 4 and sources["num-select"] == "default"
    assert settings["overwrite"] is False and settings["recon-blocks"] == []
    assert set(settings) == set(sources) and "config" not in settings and "debug" not in settings
    assert written["history"] == []
    config_file.write_run_settings(run, _parse(argv))  # a resume: same settings, no history
    assert json.loads((run / "settings.json").read_text())["history"] == []
    config_file.write_run_settings(run, _parse([*argv, "--target", "W8A8"]))
    again = json.loads((run / "settings.json").read_text())
    assert again["settings"]["target"] == "W8A8" and again["sources"]["target"] == "command line"
    assert [h["settings"]["target"] for h in again["history"]] == ["W4A8"]
    # a written settings file is a config: the same options again
    replay = _parse(["quantize", "--config", str(run / "settings.json")])
    assert _options(replay) == _options(_parse([*argv, "--target", "W8A8"]))
    assert config_file.settings_of(replay).sources["chunk"] == "file"


def test_help_lists_the_everyday_options_first(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["quantize", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    headings = [
        "\nthe everyday options:\n",
        "\nsampling:\n",
        "\nsensitivity sweep and bit allocation:\n",
        "\nlearned rounding (",
        "\nthe source model:\n",
        "\nthe paper's metrics in the report",
    ]
    at = [out.index(h) for h in headings]
    assert at == sorted(at), out
    everyday = out[at[0] : at[1]]
    for option in (
        "--config FILE",
        "--model",
        "--target",
        "--method",
        "--run",
        "--out",
        "--preset",
        "--prompts",
        "--num-calib",
        "--steps",
        "--stop-after",
    ):
        assert option in everyday, option
    assert "relative to the current directory" in " ".join(everyday.split())  # of a file's paths
    assert out.index("--recon-iters") > at[3] and out.index("--lora-scale") > at[4]


def test_the_example_of_the_help_is_a_valid_config(tmp_path):
    from mixdq_jax.cli.quantize import _CONFIG_NOTE  # noqa: PLC0415

    example = [line[4:] for line in _CONFIG_NOTE.splitlines() if line.startswith("    ")]
    args = _parse(["quantize", "--config", str(_write(tmp_path / "r.yaml", "\n".join(example)))])
    sources = config_file.settings_of(args).sources
    assert len(example) >= 5 and sum(s == "file" for s in sources.values()) == len(example)


def test_demo_takes_a_config_file_too(tmp_path):
    config = _write(
        tmp_path / "study.yaml",
        """
out: runs/study
num_eval: 4
targets: [W8A8, W4A8]
methods: [naive, mixdq]
steps: 2
""",
    )
    from_file = _parse(["demo", "--config", str(config)])
    from_cli = _parse(["demo", "--out", "runs/study", "--num-eval", "4", "--targets", "W8A8",
                       "W4A8", "--methods", "naive", "mixdq", "--steps", "2"])  # fmt: skip
    assert _options(from_file) == _options(from_cli)


def test_quantize_from_a_config_file_records_its_settings_in_the_run_and_the_export(
    tmp_path, prompts
):
    """End to end on a tiny SDXL: the file's options (one overridden on the command line)
    run the recipe, and the run directory and the exported folder say what ran."""
    from tests.tiny_models import SMALL_UNET, build_sdxl  # noqa: PLC0415  (torch: only here)

    model = build_sdxl(tmp_path / "model", unet_overrides=SMALL_UNET)
    run, out = tmp_path / "run", tmp_path / "out"
    config = _write(
        tmp_path / "recipe.yaml",
        f"""
model: {model}
target: W8A8
method: naive
run: {run}
out: {out}
prompts: {prompts}
num_calib: 2
num-select: 3
batch-size: 2
""",
    )
    assert cli.main(["quantize", "--config", str(config), "--num-select", "1"]) == 0
    assert (run / "quantize" / "W8A8_naive" / "report.json").is_file()
    recorded = json.loads((run / "settings.json").read_text())
    exported = json.loads((out / "mixdq_settings.json").read_text())
    for written in (recorded, exported):
        settings, sources = written["settings"], written["sources"]
        assert (settings["method"], settings["target"], settings["num-calib"]) == (
            "naive", "W8A8", 2)  # fmt: skip
        assert settings["num-select"] == 1 and sources["num-select"] == "command line"
        assert settings["out"] == str(out) and sources["out"] == "file"
        assert settings["steps"] == 1 and sources["steps"] == "default"
        assert written["config"] == str(config)
    assert "history" not in exported and recorded["history"] == []
    from mixdq_jax.api import load_pipeline  # noqa: PLC0415

    assert load_pipeline(out).quantized.mode is not None  # the settings file does not disturb it
