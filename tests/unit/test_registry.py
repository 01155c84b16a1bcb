"""The stage registry: discovery, lazy import, typed errors, the allow-list, options."""
from __future__ import annotations

import importlib
import importlib.metadata
import sys
import textwrap
import uuid

import pytest
from pydantic import ValidationError

from fastllm import registry
from fastllm.config import EngineConfig
from fastllm.errors import ConfigError, DuplicatePluginError, PluginLoadError, UnknownPluginError

PLUGIN = """
class Plugin:
    api_version = {api}

    def __init__(self, opt=0):
        self.opt = opt

    def apply(self, model, ctx):
        return model
"""


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Factory: install a fake distribution (dist-info + module) on sys.path for one test.

    fake_dist(name, version, {group: {entry name: "attr"}}, source) -> the module's name."""
    made: list[str] = []

    def install(name="fakeplugin", version="1.2.3", entry_points=None, source=PLUGIN.format(api=1)):
        module = f"fakeplugin_{uuid.uuid4().hex[:8]}"
        root = tmp_path / module
        info = root / f"{name}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        eps = entry_points or {"fastllm.quantizers": {"fakequant": "Plugin"}}
        (info / "entry_points.txt").write_text("".join(
            f"[{group}]\n" + "".join(f"{ep} = {module}:{attr}\n" for ep, attr in names.items())
            for group, names in eps.items()))
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(root))
        made.append(module)
        registry.discover.cache_clear()
        return module

    yield install
    for module in made:
        sys.modules.pop(module, None)
    registry.discover.cache_clear()
    importlib.invalidate_caches()


@pytest.fixture(autouse=True)
def _fresh_registry():
    registry.discover.cache_clear()
    yield
    registry.discover.cache_clear()


def test_discovery_lists_every_builtin_with_its_distribution():
    declared = [ep for ep in importlib.metadata.distribution("fastllm").entry_points
                if ep.group in registry.GROUPS.values()]
    assert declared
    stage_of = {group: stage for stage, group in registry.GROUPS.items()}
    version = importlib.metadata.version("fastllm")
    for ep in declared:
        info = registry.discover(stage_of[ep.group])[ep.name]
        assert (info.dist, info.version, info.target, info.builtin) == ("fastllm", version, ep.value, True)
    for stage in registry.GROUPS:
        assert registry.names(stage), f"no built-in {stage}"


def test_default_stages_are_registered():
    from fastllm.config import DEFAULT_STAGES

    for stage, name in DEFAULT_STAGES.items():
        if name != "auto":
            assert name in registry.names(stage)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownPluginError, match=r"no quantizer named 'nope'.*'none'"):
        registry.load("quantizer", "nope")
    with pytest.raises(ConfigError, match="stages are"):
        registry.names("tokenizer")


def test_engine_config_names_the_valid_choices():
    with pytest.raises(ValidationError, match=r"unknown quantizer 'nope'; valid quantizer names: \[.*'none'"):
        EngineConfig(quantizer="nope")
    with pytest.raises(ValidationError, match="'sdpa'"):
        EngineConfig(attention={"name": "nope"})


def test_engine_rejects_an_unknown_stage_before_loading_anything():
    from fastllm import Engine

    with pytest.raises(ConfigError, match="valid quantizer names"):
        Engine("x", quantizer="nope")


def test_a_third_party_plugin_is_discovered_and_loads(fake_dist):
    module = fake_dist()
    info = registry.discover("quantizer")["fakequant"]
    assert (info.dist, info.version, info.builtin) == ("fakeplugin", "1.2.3", False)
    assert module not in sys.modules  # discovery reads names only
    obj = registry.create("quantizer", "fakequant", {"opt": 3})
    assert type(obj).__module__ == module and obj.opt == 3
    assert EngineConfig(quantizer={"name": "fakequant", "opt": 1}).quantizer.options == {"opt": 1}


@pytest.mark.parametrize("source,attr,why", [
    ("raise ImportError('needs libfoo')", "Plugin", "needs libfoo"),
    (PLUGIN.format(api=1), "Missing", "Missing"),
    ("def broken(:\n", "Plugin", "SyntaxError"),
])
def test_a_broken_plugin_fails_when_selected_naming_its_distribution(fake_dist, source, attr, why):
    module = fake_dist(entry_points={"fastllm.pruners": {"broken": attr}}, source=source)
    assert "broken" in registry.names("pruner")  # discovery does not import it...
    assert module not in sys.modules
    registry.create("pruner", "none")  # ...nor does choosing another pruner
    with pytest.raises(PluginLoadError, match=rf"fakeplugin 1\.2\.3.*{why}"):
        registry.create("pruner", "broken")


def test_a_wrong_api_version_names_the_distribution(fake_dist):
    fake_dist(version="0.9", source=PLUGIN.format(api=2))
    with pytest.raises(PluginLoadError, match=r"from fakeplugin 0\.9 declares api_version=2.*api_version=1"):
        registry.load("quantizer", "fakequant")


def test_a_name_registered_twice_names_both_distributions(fake_dist):
    fake_dist(name="fakeplugin", version="1.2.3")
    fake_dist(name="otherplugin", version="4.5")
    with pytest.raises(DuplicatePluginError, match=r"fakeplugin 1\.2\.3.*otherplugin 4\.5|otherplugin 4\.5.*fakeplugin 1\.2\.3"):
        registry.discover("quantizer")


def test_a_plugin_cannot_shadow_a_builtin(fake_dist):
    fake_dist(entry_points={"fastllm.quantizers": {"none": "Plugin"}})
    with pytest.raises(DuplicatePluginError, match=r"fastllm .*fakeplugin 1\.2\.3|fakeplugin 1\.2\.3.*fastllm"):
        registry.names("quantizer")


def test_allow_list_hides_unlisted_plugins_but_keeps_builtins(fake_dist, monkeypatch):
    fake_dist()
    fake_dist(name="otherplugin", version="4.5", entry_points={"fastllm.pruners": {"otherprune": "Plugin"}})
    monkeypatch.setenv("FASTLLM_PLUGINS", "otherplugin")
    registry.discover.cache_clear()
    assert "fakequant" not in registry.names("quantizer")
    assert "none" in registry.names("quantizer")
    assert "otherprune" in registry.names("pruner")
    with pytest.raises(UnknownPluginError):
        registry.load("quantizer", "fakequant")
    monkeypatch.setenv("FASTLLM_PLUGINS", "fakequant")  # a stage name works too
    registry.discover.cache_clear()
    assert "fakequant" in registry.names("quantizer") and "otherprune" not in registry.names("pruner")


def test_allow_list_skips_a_duplicate_it_hides(fake_dist, monkeypatch):
    fake_dist(entry_points={"fastllm.quantizers": {"none": "Plugin"}})
    monkeypatch.setenv("FASTLLM_PLUGINS", "someone-else")
    registry.discover.cache_clear()
    assert registry.discover("quantizer")["none"].builtin


def test_stage_options_reach_the_constructor(fake_dist):
    fake_dist()
    cfg = EngineConfig(quantizer={"name": "fakequant", "opt": 1})
    obj = registry.create("quantizer", cfg.quantizer.name, cfg.quantizer.options)
    assert obj.opt == 1


def test_a_bad_option_is_a_config_error(fake_dist):
    fake_dist()
    with pytest.raises(ConfigError, match=r"quantizer 'fakequant' rejected its options \{'bogus': 1\}"):
        registry.create("quantizer", "fakequant", {"bogus": 1})
    with pytest.raises(ConfigError, match="rejected"):
        registry.create("attention", "sdpa", {"page_size": 16})


def test_a_refused_option_value_is_a_config_error_naming_the_stage(fake_dist):
    fake_dist(source=PLUGIN.format(api=1) + """
class Strict(Plugin):
    def __init__(self, opt=0):
        if opt < 0:
            raise ValueError("opt must be >= 0")
        super().__init__(opt)
""", entry_points={"fastllm.quantizers": {"strict": "Strict"}})
    with pytest.raises(ConfigError, match=r"quantizer 'strict' rejected its options \{'opt': -1\}: opt must be >= 0"):
        registry.create("quantizer", "strict", {"opt": -1})
    assert registry.create("quantizer", "strict", {"opt": 2}).opt == 2
