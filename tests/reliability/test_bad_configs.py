"""Malformed experiment configs: each is rejected before any compute, naming the YAML path.

Every case starts from `configs/tiny.yaml` and changes one thing. Most are checked with
`load_config` in-process (it is what every CLI command calls first); a few go through
`python -m pipeline validate|run` to check the exit code (2), the message on stderr and
that no run directory was created.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())


def _set(path: str, value) -> Callable[[dict, Path], None]:
    """A mutation setting `a.b[1].c` to `value` in the raw YAML dict."""
    def mutate(raw: dict, _tmp: Path) -> None:
        node, keys = raw, _keys(path)
        for k in keys[:-1]:
            node = node[k] if isinstance(k, int) or k in node else node.setdefault(k, {})
        node[keys[-1]] = value
    return mutate


def _keys(path: str) -> list:
    out = []
    for part in path.replace("]", "").split("."):
        name, *idx = part.split("[")
        out += [name] + [int(i) for i in idx]
    return out


def _hf_dir(path: Path, vocab: list[str], vocab_size: int | None = None) -> Path:
    """A tokenizer-only HF directory (config.json + tokenizer.json): all the vocabulary
    check reads, so no weights are needed."""
    from tokenizers import Tokenizer, models

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=vocab[0]))
    tok.save(str(path / "tokenizer.json"))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": vocab_size or len(vocab)}))
    return path


def _tiny_vocab_dir(path: Path) -> Path:
    """An HF directory holding exactly the tiny student's tokenizer."""
    from engine.tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    tok.save_pretrained(str(path))
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2", "vocab_size": len(tok)}))
    return path


def _other_vocab(n: int) -> list[str]:
    return ["<unk>"] + [f"w{i}" for i in range(n - 1)]


def _external_teacher(kind: str):
    def mutate(raw, tmp):
        if kind == "same_size_other_tokens_hf_base":
            raw["model"]["base"] = str(_tiny_vocab_dir(tmp / "student"))
            from engine.tokenizer import build_tiny_tokenizer

            n = len(build_tiny_tokenizer())
            teacher = _hf_dir(tmp / "teacher", _other_vocab(n))
        elif kind == "smaller_than_tiny":
            teacher = _hf_dir(tmp / "teacher", _other_vocab(40))
        elif kind == "larger_other_tokens_tiny_base":
            teacher = _hf_dir(tmp / "teacher", _other_vocab(400))
        else:
            teacher = tmp / "no-such-teacher"
        raw["opd"]["teachers"] = [{"domain": "math", "path": str(teacher)}]
    return mutate


def _data_files(train: str, eval_: str, make: bool = False):
    def mutate(raw, tmp):
        if make:
            (tmp / "eval.jsonl").write_text("")
        raw["domains"][0]["data"] = {"train": str(tmp / train), "eval": str(tmp / eval_)}
    return mutate


def _duplicate_domain(raw, _tmp):
    raw["domains"].append(copy.deepcopy(raw["domains"][0]))


def _domains_as_mapping(raw, _tmp):
    raw["domains"] = {d["name"]: d for d in raw["domains"]}


def _both_sources(raw, tmp):
    (tmp / "t.jsonl").write_text("")
    raw["domains"][0]["data"]["train"] = str(tmp / "t.jsonl")
    raw["domains"][0]["data"]["eval"] = str(tmp / "t.jsonl")


def _shared_start_with_domain_sft(raw, _tmp):
    raw["expert_init"] = "sft:all"
    raw["domains"][1]["sft"] = {"steps": 10}


def _shared_start_student_from_domain(raw, _tmp):
    raw["expert_init"] = "sft:all"
    for d in raw["domains"]:
        d.pop("sft", None)
    raw["opd"]["student_init"] = "sft:math"


# (case id, mutation, overrides, YAML path the message must name)
CASES = [
    ("unknown_top_level_key", _set("tranier", {}), [], "tranier"),
    ("unknown_key_depth2", _set("model.tiny.hidden", 64), [], "model.tiny.hidden"),
    ("unknown_key_depth3_in_list", _set("domains[1].grpo.clip_hgih", 0.3), [], "domains[1].grpo.clip_hgih"),
    ("unknown_key_in_opd", _set("opd.round", 2), [], "opd.round"),
    ("wrong_type_int", _set("opd.rounds", "three"), [], "opd.rounds"),
    ("wrong_type_float", _set("trainer.lr", "fast"), [], "trainer.lr"),
    ("wrong_type_list", _domains_as_mapping, [], "domains"),
    ("negative_batch", _set("domains[0].sft.batch_size", -4), [], "domains[0].sft.batch_size"),
    ("zero_generator_batch", _set("generator.batch_size", 0), [], "generator.batch_size"),
    ("negative_train_size", _set("domains[3].data.synthetic.train_size", -1), [],
     "domains[3].data.synthetic.train_size"),
    ("negative_gpus", _set("resources.num_gpus", -1), [], "resources.num_gpus"),
    ("clip_low_ge_1", _set("domains[0].grpo.clip_low", 1.0), [], "domains[0].grpo.clip_low"),
    ("clip_low_negative", _set("mixed_rl.grpo.clip_low", -0.2), [], "mixed_rl.grpo.clip_low"),
    ("clip_high_negative", _set("domains[2].grpo.clip_high", -0.1), [], "domains[2].grpo.clip_high"),
    ("group_size_1", _set("domains[0].grpo.group_size", 1), [], "domains[0].grpo.group_size"),
    ("jsd_beta_gt_1", _set("opd.jsd_beta", 1.5), [], "opd.jsd_beta"),
    ("loss_aggregation_typo", _set("opd.loss_aggregation", "teacher_mean"), [], "opd.loss_aggregation"),
    ("min_lr_ratio_gt_1", _set("student_sft.min_lr_ratio", 2.0), [], "student_sft.min_lr_ratio"),
    ("heads_not_divisible", _set("model.tiny.num_heads", 3), [], "model.tiny"),
    ("cosine_without_total_steps", _set("trainer.schedule", "cosine"), [], "trainer"),
    ("bad_experiment_name", _set("experiment", "../evil"), [], "experiment"),
    ("bad_on_bad_row", _set("domains[0].data.on_bad_row", "ignore"), [], "domains[0].data.on_bad_row"),
    ("empty_domains", _set("domains", []), [], "domains"),
    ("missing_train_file", _data_files("missing.jsonl", "eval.jsonl", make=True), [], "domains[0].data.train"),
    ("missing_eval_file", _data_files("eval.jsonl", "missing-eval.jsonl", make=True), [],
     "domains[0].data.eval"),
    ("synthetic_and_train", _both_sources, [], "domains[0].data"),
    ("unknown_verifier", _set("domains[2].verifier", "ifevall"), [], "domains[2].verifier"),
    ("unknown_generator", _set("domains[1].data.synthetic.generator", "cobol"), [],
     "domains[1].data.synthetic.generator"),
    ("unknown_generator_backend", _set("generator.backend", "sglang"), [], "generator.backend"),
    ("cuda_trainer_zero_gpus", _set("trainer.device", "cuda"), [], "trainer.device"),
    ("student_init_missing_domain", _set("opd.student_init", "sft:chess"), [], "opd.student_init"),
    ("domain_share_unknown_domain", _set("student_sft.domain_shares", {"chess": 2.0}), [],
     "student_sft.domain_shares.chess"),
    ("domain_share_not_positive", _set("student_sft.domain_shares", {"tool": -1.0}), [], "student_sft"),
    ("expert_init_typo", _set("expert_init", "sft:each"), [], "expert_init"),
    ("expert_init_shared_with_domain_sft", _shared_start_with_domain_sft, [], "domains[1].sft"),
    ("expert_init_shared_student_from_domain_sft", _shared_start_student_from_domain, [], "opd.student_init"),
    ("missing_base_model_dir", _set("model.base", "/no/such/model"), [], "model.base"),
    ("teacher_path_missing", _external_teacher("missing"), [], "opd.teachers[0].path"),
    ("teacher_other_vocab_hf_student", _external_teacher("same_size_other_tokens_hf_base"), [],
     "opd.teachers[0].path"),
    ("teacher_vocab_smaller_than_tiny", _external_teacher("smaller_than_tiny"), [], "opd.teachers[0].path"),
    ("override_without_equals", None, ["opd.rounds"], "opd.rounds"),
    ("override_unknown_list_item", None, ["domains.chess.grpo.lr=1e-5"], "domains.chess"),
    ("override_wrong_type", None, ["domains.math.grpo.steps=-3"], "domains[0].grpo.steps"),
    ("override_into_scalar", None, ["seed.value=3"], "seed.value"),
]

def _student_dir_without_config(raw, tmp):
    (tmp / "student").mkdir()
    raw["opd"]["student_init"] = str(tmp / "student")


def _adapter(name: str):
    def mutate(raw, tmp):
        (tmp / "t.jsonl").write_text("")
        raw["domains"][0]["data"] = {"train": str(tmp / "t.jsonl"), "eval": str(tmp / "t.jsonl"), "adapter": name}
    return mutate


def _run_dir_under_a_file(raw, tmp):
    (tmp / "a-file").write_text("")
    raw["run_dir"] = str(tmp / "a-file" / "run")


def _teacher_with_corrupt_tokenizer(raw, tmp):
    teacher = _hf_dir(tmp / "teacher", _other_vocab(40))
    (teacher / "tokenizer.json").write_text("{not json")
    raw["opd"]["teachers"] = [{"domain": "math", "path": str(teacher)}]


# Issue 16: what used to slip through `validate` (found only when a later stage started)
# or came out as a traceback.
CASES += [
    ("lr_inf", _set("trainer.lr", float("inf")), [], "trainer.lr"),
    ("grpo_lr_inf", _set("domains[0].grpo.lr", float("inf")), [], "domains[0].grpo.lr"),
    ("temperature_inf", _set("domains[2].grpo.temperature", float("inf")), [], "domains[2].grpo.temperature"),
    ("eval_temperature_inf_override", None, ["eval.temperature=.inf"], "eval.temperature"),
    ("jsd_beta_nan", _set("opd.jsd_beta", float("nan")), [], "opd.jsd_beta"),
    ("stage_cpus_nan", _set("resources.default.num_cpus", float("nan")), [], "resources.default.num_cpus"),
    ("advantage_typo", _set("domains[0].grpo.advantage", "grpoo"), [], "domains[0].grpo.advantage"),
    ("policy_loss_typo", _set("mixed_rl.grpo.policy_loss", "gpso"), [], "mixed_rl.grpo.policy_loss"),
    ("kl_estimator_typo", _set("domains[1].grpo.kl_estimator", "k4"), [], "domains[1].grpo.kl_estimator"),
    ("loss_agg_typo", _set("domains[1].grpo.loss_agg", "token_mean"), [], "domains[1].grpo.loss_agg"),
    ("divergence_typo", _set("opd.divergence", "reverse-kl"), [], "opd.divergence"),
    ("optimizer_typo", _set("trainer.optimizer", "adam"), [], "trainer.optimizer"),
    ("generator_backend_typo", _set("generator.backend", "hff"), [], "generator.backend"),
    ("adapter_typo", _adapter("gsm8kk"), [], "domains[0].data.adapter"),
    ("student_init_missing_path", _set("opd.student_init", "/no/such/checkpoint"), [], "opd.student_init"),
    ("student_init_dir_without_config", _student_dir_without_config, [], "opd.student_init"),
    ("tokenizer_missing_path", _set("model.tokenizer", "./no/such/tokenizer"), [], "model.tokenizer"),
    ("teacher_corrupt_tokenizer_json", _teacher_with_corrupt_tokenizer, [], "opd.teachers[0].path"),
    ("stage_resources_typo_stage", _set("resources.stages", {"gpro:math": {"num_cpus": 1}}), [],
     "resources.stages.gpro:math"),
    ("stage_resources_unknown_domain", _set("resources.stages", {"grpo:chess": {"num_cpus": 1}}), [],
     "resources.stages.grpo:chess"),
    ("stage_resources_unknown_key", _set("resources.stages", {"grpo": {"num_cpu": 1}}), [],
     "resources.stages.grpo.num_cpu"),
    ("betas_out_of_range", _set("trainer.betas", [2, -1]), [], "trainer.betas"),
    ("steps_true", _set("domains[0].grpo.steps", True), [], "domains[0].grpo.steps"),
    ("lr_false_override", None, ["student_sft.lr=false"], "student_sft.lr"),
    ("samples_true", _set("eval.samples", True), [], "eval.samples"),
    ("run_dir_under_proc", _set("run_dir", "/proc/polymath-run"), [], "run_dir"),
    ("run_dir_under_a_file", _run_dir_under_a_file, [], "run_dir"),
    ("override_yaml_syntax_error", None, ["opd.rounds=[1, 2"], "opd.rounds"),
    ("override_nested_50k", None, ["seed=" + "[" * 50_000 + "]" * 50_000], "seed"),
    ("override_duplicate_key", None, ["opd={rounds: 2, rounds: 3}"], "opd.rounds"),
]


def _yaml_text(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False)


def _duplicate(key_line: str, after: str) -> Callable[[str], str]:
    """Insert `key_line` after the first line starting with `after` (same indentation)."""
    def edit(text: str) -> str:
        lines = text.splitlines()
        i = next(k for k, line in enumerate(lines) if line.startswith(after))
        return "\n".join(lines[: i + 1] + [key_line] + lines[i + 1:]) + "\n"
    return edit


# Raw YAML text the dict mutations above cannot express: (case, edit of the YAML text or bytes, YAML path)
TEXT_CASES = [
    ("duplicate_top_level_key", _duplicate("seed: 1", "seed:"), "seed"),
    ("duplicate_nested_key", _duplicate("    lr: 0.5", "    lr:"), "domains[0].grpo.lr"),
    ("invalid_utf8", lambda text: text.encode() + b"# caf\xe9\n", "bad.yaml"),
    ("nested_50k_deep", lambda text: text + "extra: " + "[" * 50_000 + "]" * 50_000 + "\n", "bad.yaml"),
    ("nested_50k_deep_block", lambda text: text + "".join(" " * i + "k:\n" for i in range(3000)), "bad.yaml"),
]


def _write_text(tmp: Path, edit) -> Path:
    raw = copy.deepcopy(TINY)
    raw["run_dir"] = str(tmp / "run")
    out = edit(_yaml_text(raw))
    path = tmp / "bad.yaml"
    path.write_bytes(out if isinstance(out, bytes) else out.encode())
    return path


@pytest.mark.parametrize("case,edit,where", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_bad_yaml_text_rejected_naming_the_yaml_path(case, edit, where, tmp_path, fault_log):
    err = _rejected(_write_text(tmp_path, edit), [])
    assert any(p == where or p.endswith(where) for p, _ in err.errors), err.errors
    fault_log(f"config: {case}", "detected")


def _validate_in_process(args: list[str], capsys) -> tuple[int, str]:
    from pipeline.cli import main

    code = main(["validate", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case,mutate,overrides,where", CASES, ids=[c[0] for c in CASES])
def test_validate_exits_2_naming_the_yaml_path(case, mutate, overrides, where, tmp_path, capsys):
    """Every bad config through the `validate` entry point: exit code 2 and the path on stderr."""
    code, err = _validate_in_process([str(_write(tmp_path, mutate)), *overrides], capsys)
    assert code == 2 and f"config error: {where}" in err, (case, code, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,edit,where", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_validate_exits_2_on_bad_yaml_text(case, edit, where, tmp_path, capsys):
    code, err = _validate_in_process([str(_write_text(tmp_path, edit))], capsys)
    assert code == 2 and "config error: " in err and where in err, (case, code, err)


def test_a_typo_in_a_registry_name_is_caught_without_torch():
    """`validate` knows the advantage / policy-loss / KL-estimator names torch-free."""
    code = ("import sys\nfrom pipeline.cli import main\n"
            f"rc = main(['validate', {str(ROOT / 'configs' / 'tiny.yaml')!r}, 'domains.math.grpo.advantage=dr_grpoo'])\n"
            "assert rc == 2, rc\nassert 'torch' not in sys.modules, 'validate imported torch'\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "config error: domains[0].grpo.advantage: Value error, unknown advantage estimator 'dr_grpoo'" in out.stderr


# Cross-field checks (`pipeline.config.cross_errors`), named at the offending item's path
# (README Findings 4: were reported at `<root>`).
CROSS_FIELD = {
    "duplicate_domain_names": (_duplicate_domain, "domains[4].name"),
    "opd_teacher_missing_domain": (_set("opd.teachers", [{"domain": "chess"}]), "opd.teachers[0].domain"),
}
# A tiny student's vocabulary compared by tokens, not only size (README Findings 5: was accepted).
OTHER_VOCAB_TINY_STUDENT = {
    "teacher_other_vocab_tiny_student": (_external_teacher("larger_other_tokens_tiny_base"), "opd.teachers[0].path"),
}


def _write(tmp: Path, mutate) -> Path:
    raw = copy.deepcopy(TINY)
    raw["run_dir"] = str(tmp / "run")
    if mutate is not None:
        mutate(raw, tmp)
    path = tmp / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _rejected(path: Path, overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    err = info.value
    assert err.errors and all(isinstance(p, str) and p and r for p, r in err.errors), err.errors
    return err


@pytest.mark.parametrize("case,mutate,overrides,where", CASES, ids=[c[0] for c in CASES])
def test_malformed_config_rejected_naming_the_yaml_path(case, mutate, overrides, where, tmp_path, fault_log):
    err = _rejected(_write(tmp_path, mutate), overrides)
    paths = [p for p, _ in err.errors]
    assert any(p == where or p.startswith(where + ".") or p.startswith(where + "[") for p in paths) \
        or where in str(err), f"{case}: expected the message to name {where!r}, got {err.errors}"
    assert not (tmp_path / "run").exists()  # nothing created: rejected before any compute
    fault_log(f"config: {case}", "detected")


@pytest.mark.parametrize("case", sorted(CROSS_FIELD))
def test_cross_field_errors_name_the_yaml_path(case, tmp_path, fault_log):
    mutate, where = CROSS_FIELD[case]
    err = _rejected(_write(tmp_path, mutate), [])
    assert where in [p for p, _ in err.errors], err.errors
    fault_log(f"config: {case}", "detected")


@pytest.mark.parametrize("case", sorted(OTHER_VOCAB_TINY_STUDENT))
def test_external_teacher_with_another_vocabulary_rejected_for_a_tiny_student(case, tmp_path, fault_log):
    mutate, where = OTHER_VOCAB_TINY_STUDENT[case]
    err = _rejected(_write(tmp_path, mutate), [])
    assert where in [p for p, _ in err.errors], err.errors
    fault_log(f"config: {case}", "detected")


def test_external_teacher_built_as_tiny_accepted_for_a_tiny_student(tmp_path):
    """The other side of the vocabulary check: a teacher checkpoint with the tiny tokenizer
    (config vocab_size padded to a multiple of 8, as `materialize_tiny` writes) passes."""
    def mutate(raw, tmp):
        teacher = _tiny_vocab_dir(tmp / "teacher")
        config = json.loads((teacher / "config.json").read_text())
        config["vocab_size"] = -(-config["vocab_size"] // 8) * 8
        (teacher / "config.json").write_text(json.dumps(config))
        raw["opd"]["teachers"] = [{"domain": "math", "path": str(teacher)}]

    cfg = load_config(_write(tmp_path, mutate))
    assert cfg.opd.teachers[0].path == str(tmp_path / "teacher")


@pytest.mark.parametrize("text,reason", [("domains: [a, b\n", "not valid YAML"),
                                         ("- just\n- a list\n", "top level must be a mapping"),
                                         ("", "top level must be a mapping"),
                                         ("experiment: x\n\tdomains: []\n", "not valid YAML")],
                         ids=["unclosed_flow", "list_top_level", "empty_file", "tab_indent"])
def test_unparseable_files_rejected_naming_the_file(text, reason, tmp_path, fault_log):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    err = _rejected(path, [])
    assert err.errors[0][0] == str(path) and reason in err.errors[0][1]
    fault_log(f"config: {reason} ({text[:12]!r})", "detected")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cmd,mutate,overrides,where", [
    ("validate", _set("domains[1].grpo.clip_hgih", 0.3), [], "domains[1].grpo.clip_hgih"),
    ("validate", None, ["generator.backend=sglang"], "generator.backend"),
    ("run", _set("domains[0].grpo.clip_low", 1.5), [], "domains[0].grpo.clip_low"),
    ("validate", None, ["opd.rounds=[1, 2"], "opd.rounds"),
    ("run", _set("trainer.lr", float("inf")), [], "trainer.lr"),
], ids=["validate_unknown_key", "validate_backend_override", "run_inverted_clip", "validate_override_syntax_error",
        "run_lr_inf"])
def test_cli_exits_2_naming_the_path_and_creates_no_run_dir(cmd, mutate, overrides, where, tmp_path, fault_log):
    path = _write(tmp_path, mutate)
    out = _cli(cmd, str(path), *overrides)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "config error:" in out.stderr and where in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()
    fault_log(f"config via `pipeline {cmd}`: {where}", "detected")
