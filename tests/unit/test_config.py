"""The experiment schema, overrides, CLI validate/plan, and every shipped YAML."""

import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from pipeline.config import ConfigError, apply_override, load_config
from pipeline.graph import build_graph, input_hashes

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_shipped_config_validates(path, monkeypatch):
    """tiny.yaml fully; the GPU examples read data the user exports first, so for them
    every check but "data file exists" must pass; my_project's model directory is the
    user's own (tests/e2e/test_my_project.py validates it with one)."""
    monkeypatch.chdir(ROOT)
    if "examples" not in path.parts:
        assert load_config(path).domains
        return
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        others = [(p, r) for p, r in exc.errors if not (".data." in p and r.startswith("file not found"))
                  and p != "run_dir"  # on the cluster's shared storage, not this machine's
                  and not (p == "model.base" and "my_project" in path.parts)]  # the user's own model directory
        assert not others, others
        cfg = load_config(path, check_files=False)
    assert cfg.domains and (cfg.resources.num_gpus > 0 or "my_project" in path.parts)  # that one runs on CPU too


def _write(tmp_path, raw):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _tiny_raw():
    return yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def test_config_is_frozen(tmp_path):
    cfg = load_config(_write(tmp_path, _tiny_raw()))
    with pytest.raises(Exception):
        cfg.seed = 3


def test_errors_name_every_yaml_path(tmp_path):
    raw = _tiny_raw()
    raw["opd"]["roundz"] = 3  # unknown key
    raw["domains"][1]["grpo"] = {"clip_high": "wide"}  # wrong type
    raw["domains"][2]["data"] = {"train": "nope/train.jsonl", "eval": "nope/eval.jsonl"}  # missing file
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, raw))
    paths = [p for p, _ in exc.value.errors]
    assert "opd.roundz" in paths
    assert "domains[1].grpo.clip_high" in paths
    assert "domains[2].data.train" in paths


def test_grpo_eval_every_is_refused(tmp_path):
    # GRPO has no periodic eval (the eval stage scores every model): a key that would be
    # accepted and never read is a config error naming its path
    raw = _tiny_raw()
    raw["domains"][0]["grpo"] = {**raw["domains"][0].get("grpo", {}), "eval_every": 5}
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, raw))
    assert [p for p, _ in exc.value.errors] == ["domains[0].grpo.eval_every"]


def test_max_verifier_error_rate_defaults_to_all_and_is_validated(tmp_path):
    assert load_config(_write(tmp_path, _tiny_raw())).max_verifier_error_rate == 1.0
    for bad in (0, 1.5, -1, "half"):
        raw = _tiny_raw()
        raw["max_verifier_error_rate"] = bad
        with pytest.raises(ConfigError) as exc:
            load_config(_write(tmp_path, raw))
        assert [p for p, _ in exc.value.errors] == ["max_verifier_error_rate"], bad


def test_validate_cli_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "pipeline", "validate", "configs/tiny.yaml"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    raw = _tiny_raw()
    raw["domains"][0]["verifier"] = "astrology"
    raw["mystery"] = 1
    bad = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(_write(tmp_path, raw))],
                         cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2
    assert "config error: mystery:" in bad.stderr
    assert "config error: domains[0].verifier: unknown verifier 'astrology'" in bad.stderr


def test_dotted_overrides_address_domains_by_name(tmp_path):
    cfg = load_config(_write(tmp_path, _tiny_raw()), ["domains.math.grpo.lr=1e-5", "opd.rounds=5"])
    assert cfg.domain("math").grpo.lr == 1e-5
    assert cfg.domain("code").grpo.lr != 1e-5
    assert cfg.opd.rounds == 5
    with pytest.raises(ConfigError):
        apply_override({"domains": [{"name": "math"}]}, "domains.physics.grpo.lr=1")


def test_vllm_without_gpu_needs_the_cpu_build(tmp_path, monkeypatch):
    from engine import vllm_support

    monkeypatch.setattr(vllm_support, "installed_vllm", lambda: ("vllm", "0.32.0"))  # the CUDA build
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, _tiny_raw()), ["generator.backend=vllm"])
    assert "generator.backend" in str(exc.value) and "num_gpus" in str(exc.value)


def test_a_change_invalidates_exactly_the_downstream_stages(tmp_path):
    p = _write(tmp_path, _tiny_raw())
    before = input_hashes(build_graph(load_config(p)))
    after = input_hashes(build_graph(load_config(p, ["domains.math.grpo.lr=1e-5"])))
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"grpo:math", "opd", "eval", "report"}


def test_fields_added_later_keep_old_hashes_at_their_default(tmp_path):
    """SFT's pack_length, loss_aggregation and domain_shares joined after runs existed: at their defaults
    they leave every stage hash as it was (the dump without them); set, they invalidate
    exactly the stages downstream of that SFT."""
    from pipeline.graph import _dump

    raw = _tiny_raw()
    for key in ("pack_length", "loss_aggregation"):
        raw["student_sft"].pop(key, None)
    cfg = load_config(_write(tmp_path, raw))
    dumped = _dump(cfg.student_sft)
    full = cfg.student_sft.model_dump(mode="json")
    assert set(full) - set(dumped) == {"pack_length", "loss_aggregation", "domain_shares"}
    base = input_hashes(build_graph(cfg))
    explicit = input_hashes(build_graph(load_config(_write(tmp_path, raw), ["student_sft.loss_aggregation=token_mean"])))
    assert explicit == base
    changed = input_hashes(build_graph(load_config(_write(tmp_path, raw),
                                                   ["student_sft.loss_aggregation=domain_token_mean"])))
    downstream = {"sft:all", "mixed_rl", "opd", "eval", "report"} | {
        f"grpo:{d}" for d in cfg.domain_names if cfg.expert_start(d) == "sft:all"}  # experts started from it
    assert {k for k in base if base[k] != changed[k]} == downstream
    shared = input_hashes(build_graph(load_config(_write(tmp_path, raw), [
        "student_sft.loss_aggregation=domain_token_mean", "student_sft.domain_shares={tool: 2}"])))
    assert {k for k in base if shared[k] != changed[k]} == downstream
    with pytest.raises(ConfigError, match="pack_length"):
        load_config(_write(tmp_path, raw), ["student_sft.pack_length=8"])


def test_experts_from_the_shared_sft(tmp_path):
    """expert_init 'sft:all': no per-domain SFT stages, every grpo:<d> after sft:all (which the
    runner launches first), and a change to the shared SFT reruns every expert; the default
    keeps the per-domain SFT stages and their hashes."""
    raw = _tiny_raw()
    raw.pop("expert_init", None)
    for d in raw["domains"]:
        d.setdefault("sft", {"steps": 10})
    per_domain = build_graph(load_config(_write(tmp_path, raw)))
    assert [s.name for s in per_domain][:2] == ["prepare", "sft:all"]
    assert {s.name: s.deps for s in per_domain}["grpo:math"] == ("sft:math",)
    for d in raw["domains"]:
        d.pop("sft")
    raw["expert_init"] = "sft:all"
    cfg = load_config(_write(tmp_path, raw))
    stages = {s.name: s.deps for s in build_graph(cfg)}
    assert not [n for n in stages if n.startswith("sft:") and n != "sft:all"]
    assert all(stages[f"grpo:{d}"] == ("sft:all",) for d in cfg.domain_names)
    assert cfg.expert_start("math") == "sft:all"
    base = input_hashes(build_graph(cfg))
    changed = input_hashes(build_graph(load_config(_write(tmp_path, raw), ["student_sft.lr=1e-3"])))
    assert {k for k in base if base[k] != changed[k]} == set(base) - {"prepare"}


def test_a_domain_data_version_reruns_prepare_and_everything_after_it(tmp_path, monkeypatch):
    """Domain.data_version enters prepare's input hash from 2 on (version 1 leaves the hash
    as it was before the field existed), so changed synthetic rows are regenerated."""
    import dataclasses

    import engine.domains
    from pipeline.graph import _data_versions

    cfg = load_config(_write(tmp_path, _tiny_raw()))
    real = engine.domains.get_domain

    def hashes(version):
        monkeypatch.setattr(engine.domains, "get_domain", lambda n: dataclasses.replace(real(n), data_version=version))
        return _data_versions(cfg), input_hashes(build_graph(cfg))

    (v1, one), (v7, seven) = hashes(1), hashes(7)
    assert v1 == {} and v7 == {"data_versions": {d.name: 7 for d in cfg.domains}}
    assert all(one[k] != seven[k] for k in one)  # prepare changed, and every stage depends on it


def test_plan_lists_stages_with_submit_lines():
    out = subprocess.run([sys.executable, "-m", "pipeline", "plan", "configs/tiny.yaml"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for d in ("math", "code", "ifeval", "tool"):  # the experts start from sft:all (expert_init)
        assert re.search(rf"\. grpo:{d} +after: sft:all ", out), out[:3000]
    assert "sft:all" in out and "sft:math" not in out
    for s in ("opd", "eval", "report"):
        assert f" {s} " in out
    # the job `pipeline run --address` submits: one rank's CPUs, the upload excludes, the run dir
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir . --entrypoint-num-cpus 1 " in out
    assert f"-- python -m pipeline stage configs/tiny.yaml opd run_dir={ROOT / 'runs' / 'tiny'}" in out
    assert '"excludes": [".venv", "runs"' in out
    assert out.index("grpo:math") < out.index(" opd ") < out.index(" eval ") < out.index(" report ")


def test_torch_free_registry_names_equal_the_registries():
    """The config checks these names without importing torch (engine/settings.py); each list
    must be exactly its registry's keys, so a new entry is selectable and a typo is not."""
    import typing

    from distill.kl import DIVERGENCES
    from distill.opd_settings import OPDSettings
    from engine.generation import GENERATORS
    from engine.optim import OPTIMIZERS
    from engine.trainer_settings import TrainerSettings
    from experts import grpo_settings as g
    from experts.advantages import ADVANTAGE_ESTIMATORS
    from experts.losses import AGGREGATION_MODES, KL_ESTIMATORS, POLICY_LOSSES
    from pipeline.config import GeneratorConfig

    def literal(model, field):
        return set(typing.get_args(model.model_fields[field].annotation))

    assert set(g.ADVANTAGE_ESTIMATOR_NAMES) == set(ADVANTAGE_ESTIMATORS)
    assert set(g.POLICY_LOSS_NAMES) == set(POLICY_LOSSES)
    assert set(g.KL_ESTIMATOR_NAMES) == set(KL_ESTIMATORS)
    assert literal(g.GRPOSettings, "loss_agg") == set(AGGREGATION_MODES)
    assert literal(OPDSettings, "divergence") == set(DIVERGENCES)
    assert literal(TrainerSettings, "optimizer") == set(OPTIMIZERS)
    assert literal(GeneratorConfig, "backend") == set(GENERATORS)


def test_stage_kinds_cover_every_stage_of_the_graph(tmp_path):
    from pipeline.graph import STAGE_KINDS

    raw = _tiny_raw()
    raw["mixed_rl"] = {"enabled": True}
    kinds = {s.kind for s in build_graph(load_config(_write(tmp_path, raw)))}
    assert kinds == set(STAGE_KINDS)


def test_stage_resources_accept_stage_names_and_kinds(tmp_path):
    raw = _tiny_raw()
    raw.setdefault("resources", {})["stages"] = {"grpo:math": {"num_cpus": 2}, "opd": {"num_cpus": 1}, "mixed_rl": {}}
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.resources_for("grpo:math").num_cpus == 2 and cfg.resources_for("opd").num_cpus == 1


def test_yaml_anchors_and_merge_keys_still_load():
    """The strict reader (pipeline/config_yaml.py) refuses duplicate keys, not YAML's own
    reuse: an anchor merged into two domains' settings, overridden by a key beside it."""
    from pipeline.config_yaml import parse_yaml

    doc = parse_yaml("a: &s {steps: 7, lr: 0.01}\nb: {<<: *s, lr: 0.5}\nc: *s\n", "test")
    assert doc == {"a": {"steps": 7, "lr": 0.01}, "b": {"steps": 7, "lr": 0.5}, "c": {"steps": 7, "lr": 0.01}}


def test_two_teachers_for_one_opd_route_are_rejected(tmp_path):
    raw = _tiny_raw()
    raw["opd"]["teachers"] = [{"domain": "math"}, {"domain": "code"}, {"domain": "math", "path": "elsewhere"}]
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, raw), check_files=False)
    assert [p for p, _ in exc.value.errors if "second teacher" in _] == ["opd.teachers[2].domain"]
    raw["opd"]["teachers"] = [{"domain": "math"}, {"domain": "code"}]  # one per route: accepted
    assert len(load_config(_write(tmp_path, raw), check_files=False).teachers()) == 2
    # the OPD driver refuses such a routing too, instead of letting the last teacher win
    from distill.opd import TeacherRef, route_teachers

    refs = [TeacherRef(index=i, domain=d, name=d, model_dir="x", weight=1.0) for i, d in enumerate(["math", "math"])]
    with pytest.raises(ValueError, match="both claim route 'math'"):
        route_teachers(refs)


def test_real_model_and_data_errors_name_their_keys(tmp_path):
    """A base without a chat template names model.chat_template; a datasets source's missing
    files name their key; a real domain without tools cannot ask for multi-turn episodes."""
    from engine.model import TinySpec, materialize_tiny

    base = materialize_tiny(TinySpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                     intermediate_size=64), tmp_path / "base", seed=0)
    (base / "chat_template.jinja").unlink()
    raw = _tiny_raw()
    raw["model"] = {"base": str(base)}
    raw["domains"][3]["data"] = {"train": {"hf": {"path": "json", "data_files": "nope.jsonl"}},
                                 "eval": {"hf": {"path": str(ROOT / "tests" / "fixtures" / "no-such-dir")}},
                                 "adapter": "xlam"}
    gsm8k = str(ROOT / "tests" / "fixtures" / "gsm8k.jsonl")
    raw["domains"][0]["data"] = {"train": gsm8k, "eval": gsm8k, "adapter": "gsm8k"}
    raw["domains"][0]["grpo"]["max_turns"] = 3
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, raw))
    errors = dict(exc.value.errors)
    assert "no chat template" in errors["model.chat_template"]
    assert errors["domains[3].data.train.hf.data_files"] == "file not found: nope.jsonl"
    assert errors["domains[3].data.eval.hf.path"].startswith("dataset directory not found")
    assert "no tool environment" in errors["domains[0].grpo.max_turns"]
    assert "domains[3].grpo.max_turns" not in errors  # real tool rows bring their own tools
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    raw["model"]["chat_template"] = str(template)
    fixture = str(ROOT / "tests" / "fixtures" / "xlam.jsonl")
    raw["domains"][3]["data"] = {"train": {"hf": {"path": "json", "data_files": fixture, "split": "train[:2]"}},
                                 "eval": {"hf": {"path": "json", "data_files": fixture, "split": "train[2:]"}},
                                 "adapter": "xlam"}
    raw["domains"][0]["grpo"]["max_turns"] = 1
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.domains[3].data.train.hf.split == "train[:2]"


def test_gradient_checkpointing_default_leaves_the_hashes(tmp_path):
    def hashes(**trainer):
        raw = _tiny_raw()
        raw["trainer"] = {**raw.get("trainer", {}), **trainer}
        return input_hashes(build_graph(load_config(_write(tmp_path, raw))))

    plain = hashes()
    assert hashes(gradient_checkpointing=False) == plain
    assert hashes(gradient_checkpointing=True)["opd"] != plain["opd"]


def test_opd_allocation_defaults_leave_the_hashes_and_other_values_move_them(tmp_path):
    def opd_hash(mutate):
        raw = _tiny_raw()
        raw["opd"]["teachers"] = [{"domain": d} for d in ("math", "code", "ifeval", "tool")]
        raw["opd"].pop("reward_weight", None)  # from its default
        raw["opd"].pop("reward_ratio", None)
        mutate(raw["opd"])
        return input_hashes(build_graph(load_config(_write(tmp_path, raw))))["opd"]

    plain = opd_hash(lambda o: None)
    # spelled-out defaults hash as omitted ones (the runs made before these options keep their stages)
    assert opd_hash(lambda o: o.update(allocation="fixed", allocation_floor=0.5)) == plain
    assert opd_hash(lambda o: o["teachers"][0].update(share=1.0)) == plain
    assert opd_hash(lambda o: o["teachers"][0].update(share=2.0)) != plain
    assert opd_hash(lambda o: o.update(allocation="kl")) != plain
    assert opd_hash(lambda o: o.update(reward_weight=0.0)) == plain
    assert opd_hash(lambda o: o.update(reward_weight=0.1)) != plain
    assert opd_hash(lambda o: o.update(reward_ratio="clip", reward_clip_low=0.2, reward_clip_high=0.28)) == plain
    assert opd_hash(lambda o: o.update(reward_ratio="none")) != plain
    assert opd_hash(lambda o: o.update(allocation="kl", allocation_floor=0.25)) != opd_hash(
        lambda o: o.update(allocation="kl"))
