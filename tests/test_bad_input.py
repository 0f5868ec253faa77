"""Bad input everywhere: each case exits 2 with one line naming the cause, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, _env, make_key_pair

# (case id, command after `python`, text the one-line error must contain)
BAD_DAEMON_SETS = [
    ("unknown top-level key", ["nonsense=1"], "nonsense: unknown key"),
    ("unknown env key", ["env.bogus=1"], "env.bogus: unknown key"),
    ("unknown agent key", ["agent.learning_rate=0.1"], "agent.learning_rate: unknown key"),
    ("unknown checkpoint key", ["checkpoint.every=5"], "checkpoint.every: unknown key"),
    ("unknown run key", ["run.steps=5"], "run.steps: unknown key"),
    ("unknown log key", ["log.verbose=true"], "log.verbose: unknown key"),
    ("unknown faults key", ["faults.retry=1"], "faults.retry: unknown key"),
    ("gamma not a number", ["agent.gamma=high"], "agent.gamma: must be float"),
    ("kwargs not a mapping", ["env.kwargs=3"], "env.kwargs: must be dict"),
    ("max_steps fractional", ["run.max_steps=1.5"], "run.max_steps: must be int or null"),
    ("bool as text", ["agent.normalize_observations=maybe"],
     "agent.normalize_observations: must be bool"),
    ("gamma above 1", ["agent.gamma=1.5"], "agent.gamma: must be in [0.0, 1.0]"),
    ("keep zero", ["checkpoint.keep=0"], "checkpoint.keep: must be >= 1"),
    ("negative interval", ["checkpoint.every_steps=-1"], "checkpoint.every_steps: must be >= 1"),
    ("unknown network", ["agent.network=resnet"], "agent.network: must be one of"),
    ("unknown optimizer", ["agent.optimizer=sgd"], "agent.optimizer: must be one of"),
    ("unknown env id", ["env.id=NoSuchGame-v9"], "env.id: unknown environment id"),
    ("bad env kwargs", ["env.id=CartPole-v1", "env.kwargs={wheels: 4}"],
     "env.kwargs: bad kwargs"),
    ("TD clip with ObGD", ["agent.td_error_clip=1"],
     "agent.td_error_clip: applies to optimizer adam"),
    ("zero TD clip", ["agent.optimizer=adam", "agent.td_error_clip=0"],
     "agent.td_error_clip: must be > 0.0 or null"),
    ("section set to a value", ["agent=3"], "agent: must be a mapping"),
    ("key under a value", ["agent.gamma.x=1"], "'gamma' is not a section"),
    ("override without =", ["agent.gamma"], "expected KEY=VALUE"),
    ("image net on vectors", ["env.id=CartPole-v1", "agent.network=shared-conv"],
     "agent.network: network 'shared-conv' needs image observations"),
    ("negative seed", ["seed=-1"], "seed: must be in [0, 4294967295]"),
    # what depends on other keys
    ("frames below the network's reach", ["env.screen_size=16"],
     "env.screen_size: 16x16 frames are smaller than the 53x53 the shared-stream network's"),
    ("a key under its former name", ["log.video_every_episodes=1"],
     "log.video_every_episodes: renamed to log.video_every_games"),
    ("a removed key", ["run.overlap_stream=false"],
     "run.overlap_stream: removed: the stream steps between two compiled updates"),
    ("another removed key", ["run.stream_process=true"],
     "run.stream_process: removed: the stream steps between two compiled updates"),
    ("no checkpoint interval", ["checkpoint.every_steps=null", "checkpoint.every_seconds=null"],
     "checkpoint.every_steps: null together with checkpoint.every_seconds"),
    ("video of a stream without frames", ["env.id=CartPole-v1", "log.video_every_games=1"],
     "log.video_every_games: CartPole-v1 renders no frames"),
    ("sticky probability 1", ["env.repeat_action_probability=1.0"],
     "env.repeat_action_probability: must be in [0, 1)"),
    ("unknown log level", ["log.level=LOUD"], "log.level: must be DEBUG"),
    ("unknown fault policy", ["faults.on_nonfinite=ignore"], "faults.on_nonfinite: must be one"),
    ("unknown export key", ["export.every=5"], "export.every: unknown key"),
    ("metrics port 0", ["log.metrics_port=0"], "log.metrics_port: must be in 1..65535 or null"),
    ("export niceness 30", ["export.niceness=30"], "export.niceness: must be in 0..19"),
]


def _daemon_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    syntax = tmp / "syntax.yaml"
    syntax.write_text("agent:\n  gamma: [0.9\n")
    listing = tmp / "list.yaml"
    listing.write_text("- a\n- b\n")
    a_file = tmp / "a-file"
    a_file.write_text("")
    short_key = tmp / "short.key"
    short_key.write_text("abc\n")
    short_key.chmod(0o600)
    open_key = tmp / "open.key"
    open_key.write_text("0" * 64 + "\n")
    open_key.chmod(0o644)
    fleet = make_key_pair(tmp, "daemon-fleet")
    daemon = ["-m", "runtime.daemon"]
    base = [*daemon, "--config", "config.yaml", "--run-dir", str(tmp / "run")]
    cases = [(name, [*base, *sum((["--set", s] for s in sets), [])], text)
             for name, sets, text in BAD_DAEMON_SETS]
    return cases + [
        ("missing config file", [*daemon, "--config", str(tmp / "none.yaml")],
         "cannot read config"),
        ("YAML syntax error", [*daemon, "--config", str(syntax)], "YAML syntax error at line"),
        ("config is a list", [*daemon, "--config", str(listing)], "must be a mapping"),
        ("no --config", daemon, "the following arguments are required: --config"),
        ("unknown flag", [*base, "--turbo"], "unrecognized arguments: --turbo"),
        ("max-steps not a number", [*base, "--max-steps", "lots"], "invalid int value"),
        ("unwritable run dir", [*daemon, "--config", "config.yaml", "--run-dir",
                                str(a_file / "run")], "run.dir: cannot write to"),
        ("missing key file", [*base, "--set", f"export.key_file={tmp / 'none.key'}"],
         "export.key_file: cannot read key file"),
        ("short key file", [*base, "--set", f"export.key_file={short_key}"],
         "export.key_file: key file"),
        ("key file others may read", [*base, "--set", f"export.key_file={open_key}"],
         "may be read by group or others (mode 644)"),
        ("a public key to sign with", [*base, "--set", f"export.key_file={fleet.public}"],
         f"export.key_file: key file {fleet.public} is a public key: the learner signs with "
         f"the private key ({fleet.private})"),
    ]


def _tool_cases(tmp: Path) -> list[tuple[str, list[str], str]]:
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    text_model = tmp / "model.onnx"
    text_model.write_text("hello")
    fleet = make_key_pair(tmp)
    open_private = make_key_pair(tmp, "readable").private
    open_private.chmod(0o640)
    garbage_public = tmp / "garbage.pub"
    garbage_public.write_text("-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n")
    export = [str(ROOT / "tools" / "export_onnx.py")]
    infer = ["-m", "runtime.infer"]
    keys = ["-m", "runtime.keys"]
    return [
        ("export: no source", [*export, "--out", str(tmp / "p.onnx")], "--run-dir"),
        ("export: missing run dir", [*export, "--run-dir", str(tmp / "nope"), "--out",
                                     str(tmp / "p.onnx")], "nope"),
        ("export: corrupt checkpoint", [*export, "--checkpoint", str(garbage), "--out",
                                        str(tmp / "p.onnx")], "bad magic"),
        ("export: both sources", [*export, "--run-dir", str(tmp), "--checkpoint", str(garbage),
                                  "--out", str(tmp / "p.onnx")], "not allowed with"),
        ("infer: missing model", [*infer, "--model", str(tmp / "none.onnx")], "not found"),
        ("infer: not an ONNX file", [*infer, "--model", str(text_model)],
         "not a loadable ONNX model"),
        ("infer: zero threads", [*infer, "--model", str(text_model), "--threads", "0"],
         "threads"),
        ("infer: no model", infer, "one of the arguments --model --follow is required"),
        ("infer: --key without --follow", [*infer, "--model", str(text_model), "--key", "k"],
         "--key applies to --follow only"),
        ("infer: --metrics-port without --follow", [*infer, "--model", str(text_model),
                                                     "--metrics-port", "9101"],
         "--metrics-port applies to --follow only"),
        ("infer: metrics port out of range", [*infer, "--follow", str(tmp), "--metrics-port",
                                              "70000"], "invalid TCP port (1-65535) value"),
        ("infer: --record with --follow", [*infer, "--follow", str(tmp), "--record", "v"],
         "--record applies to --model only"),
        ("infer: follow ftp", [*infer, "--follow", "ftp://host/policies"],
         "not a directory or an http(s) URL"),
        ("infer: follow missing key", [*infer, "--follow", str(tmp), "--key",
                                       str(tmp / "none.key")], "--key: cannot read key file"),
        ("infer: the learner's private key on a device", [*infer, "--follow", str(tmp),
                                                          "--key", str(fleet.private)],
         f"--key: key file {fleet.private} is a private key, which only the learner may "
         f"hold: give the device the public key ({fleet.public})"),
        ("infer: a corrupt public key", [*infer, "--follow", str(tmp), "--key",
                                         str(fleet.public), "--key", str(garbage_public)],
         f"--key: key file {garbage_public} is not a readable PEM Ed25519 public key"),
        ("rollback: a private key others may read",
         ["-m", "runtime.daemon.rollback", "--run-dir", str(tmp), "--to-step", "1", "--key",
          str(open_private)], f"--key: key file {open_private} may be read by group or "
                              f"others (mode 640)"),
        ("keys: a new pair over a key", [*keys, "new", str(tmp / "fleet")],
         f"keys: error: {fleet.private} exists: not replaced"),
        ("keys: id of a corrupt key", [*keys, "id", str(garbage_public)],
         "is not a readable PEM Ed25519 public key"),
        ("infer: follow zero interval", [*infer, "--follow", str(tmp), "--interval", "0"],
         "invalid positive number value"),
        ("infer: nothing to follow", [*infer, "--follow", str(tmp / "empty"), "--cache",
                                      str(tmp / "cache")], "no policy could be obtained"),
        ("infer: follow unreachable", [*infer, "--follow", "http://127.0.0.1:9/", "--cache",
                                       str(tmp / "cache")], "no policy could be obtained"),
    ]


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=_env(), text=True,
                          capture_output=True, timeout=120)


def _error_lines(stderr: str) -> list[str]:
    # The ALE prints a two-line banner when it loads; it is not ours to silence.
    return [line for line in stderr.strip().splitlines()
            if line and not line.startswith(("A.L.E:", "[Powered by Stella]"))]


def test_at_least_thirty_bad_inputs_each_exit_2_with_one_line(tmp_path: Path) -> None:
    cases = _daemon_cases(tmp_path) + _tool_cases(tmp_path)
    assert len(cases) >= 30
    failures = []
    for name, argv, expected in cases:
        done = _run(argv)
        lines = _error_lines(done.stderr)
        if done.returncode != 2 or len(lines) != 1 or expected not in lines[0] \
                or "Traceback" in done.stderr:
            failures.append(f"{name}: exit {done.returncode}, stderr {done.stderr!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("flag", ["--help"])
def test_help_is_not_an_error(flag: str) -> None:
    assert _run(["-m", "runtime.daemon", flag]).returncode == 0


def test_yaml_words_mean_what_the_user_typed(tmp_path: Path) -> None:
    """YAML 1.1 reads `off` as false and `1e-4` as a string: both are taken as meant, in
    the config file and on the command line."""
    from runtime.daemon.config import load_config
    text = (ROOT / "config.yaml").read_text().replace("onednn: auto", "onednn: off")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(text.replace("lr: 1.0 ", "lr: 1e-4 "))
    config = load_config(config_file, [])
    assert config.run.onednn == "off" and config.agent.lr == 1e-4
    assert load_config(ROOT / "config.yaml", ["run.onednn=on"]).run.onednn == "on"


def test_a_config_error_is_reported_before_torch_is_imported(tmp_path: Path) -> None:
    """The commonest bad input, a wrong key, is answered at once: the daemon reads and
    checks its config before it imports torch and the learner."""
    probe = ("import sys; from runtime.daemon.command import main; "
             "code = main(['--config', 'config.yaml', '--set', 'agent.learning_rate=1']); "
             "print(code, 'torch' in sys.modules, 'agent.learner' in sys.modules)")
    done = _run(["-c", probe])
    assert done.stdout.split() == ["2", "False", "False"], done.stderr
    assert "agent.learning_rate: unknown key" in done.stderr
