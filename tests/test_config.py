"""Every default lives once, in conf/: the schema holds none, every YAML key is in the schema and
commented, and every algo, env and tuned preset composes."""
import dataclasses
import re

import pytest
import yaml

from p2prl.algos import REGISTRY
from p2prl.checks import ConfigError
from p2prl.config import SECTIONS, RunConfig, conf_dir, config_hash, flatten

SCHEMAS = [RunConfig, *SECTIONS.values(), *{s.config for s in REGISTRY.values()}]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda c: c.__name__)
def test_the_schema_holds_no_default(schema):
    with_default = [f.name for f in dataclasses.fields(schema)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING]
    assert not with_default, f"{schema.__name__} defaults {with_default}: defaults live in conf/ only"


def _groups():
    return [(group, p.stem) for group in ("algo", "env", "comm", "checkpoint", "logger")
            for p in sorted((conf_dir() / group).glob("*.yaml"))]


@pytest.mark.parametrize("group, option", _groups(), ids=lambda x: str(x))
def test_every_option_composes_into_the_schema(group, option, compose):
    # A key missing from the YAML, or one the schema does not know, fails here (p2prl.config.section).
    if group == "algo":
        env = {"qlearning": "taxi"}.get(option, "cartpole")
        cfg = compose(f"algo={option}", f"env={env}")
        assert cfg.algo.name == option
    elif (group, option) == ("env", "gym"):  # the one option with a required key (env.id: ???)
        with pytest.raises(ConfigError, match="env.id=.*env=gym needs the gymnasium id"):
            compose("env=gym")
        cfg = compose("env=gym", "env.id=Acrobot-v1")
        assert cfg.env.id == "Acrobot-v1" and cfg.env.target_return is None
    else:
        cfg = compose(f"{group}={option}")
    assert isinstance(cfg, RunConfig)


def test_every_tuned_preset_names_an_algo_and_an_env_and_composes(compose):
    presets = sorted((conf_dir() / "tuned").glob("*.yaml"))
    assert presets
    for path in presets:
        algo, env = path.stem.split("_", 1)
        assert (conf_dir() / "algo" / f"{algo}.yaml").is_file() and (conf_dir() / "env" / f"{env}.yaml").is_file()
        raw = yaml.safe_load(path.read_text())
        cfg = compose(f"algo={algo}", f"env={env}")
        for key, value in flatten(raw).items():  # the preset's values reach the composed config
            assert cfg.flat()[key] == value, (path.name, key)


KEY_LINE = re.compile(r"^\s*[A-Za-z_][\w]*:(?!\s*$)")


@pytest.mark.parametrize("path", sorted(p.relative_to(conf_dir()) for p in conf_dir().rglob("*.yaml")), ids=str)
def test_every_yaml_key_is_commented(path):
    lines = (conf_dir() / path).read_text().splitlines()
    for i, line in enumerate(lines):
        if KEY_LINE.match(line):  # a key with a value: its comment ends the line or is the line above
            above = lines[i - 1].strip() if i else ""
            assert "#" in line or above.startswith("#"), f"{path}:{i + 1}: `{line.strip()}` has no comment"


def test_a_config_without_a_key_is_refused_naming_it(compose):
    raw = compose().to_dict()
    del raw["train"]["return_window"]
    from p2prl.precheck import to_run_config
    with pytest.raises(ConfigError, match=r"train.return_window=null: missing"):
        to_run_config(raw)


def test_a_saved_config_from_before_the_logger_section_reads_as_tensorboard(compose):
    raw = compose("logger=wandb").to_dict()
    assert raw["logger"]["name"] == "wandb"
    del raw["logger"]  # summary.json of a run from before logger existed
    from p2prl.precheck import to_run_config
    assert to_run_config(raw).logger == compose().logger


@pytest.mark.parametrize("graph", ["ring", "hypercube"])
def test_a_gossip_config_saved_with_its_graph_as_topology_reads_as_comm_graph(graph, compose):
    from p2prl.precheck import to_run_config
    raw = compose("comm=gossip", f"comm.graph={graph}").to_dict()
    del raw["comm"]["graph"]
    raw["comm"]["topology"] = graph  # summary.json or a checkpoint of a run from before comm.graph
    cfg = to_run_config(raw)
    assert (cfg.comm.graph, cfg.comm.topology) == (graph, "auto")
    assert cfg == compose("comm=gossip", f"comm.graph={graph}")


def test_a_config_saved_before_comm_graph_keeps_its_topology(compose):
    from p2prl.precheck import to_run_config
    raw = compose("comm.topology=flat").to_dict()
    del raw["comm"]["graph"]
    assert to_run_config(raw) == compose("comm.topology=flat")


def test_the_hash_ignores_where_to_resume_from(compose):
    a, b = compose(), compose("train.resume=never")
    assert a.flat() != b.flat() and config_hash(a.to_dict()) == config_hash(b.to_dict())
    assert config_hash(a.to_dict()) != config_hash(compose("seed=1").to_dict())
