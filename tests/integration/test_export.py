"""`final/` of a trained model: transformers loads it with no arguments, its greedy
generation equals the pipeline's own greedy rollout (the eval path) token for token, and
its generation config stops at the template's end-of-turn token."""

import json

import torch

from engine.export import export_final
from engine.model import TinySpec, load_tokenizer, materialize_tiny
from engine.trainer import TrainerSettings, build_trainer, with_overrides
from experts.sft import SFTSettings, run_sft

torch.set_num_threads(1)
SPEC = TinySpec(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192)


def test_final_loads_without_arguments_and_matches_the_stage_greedy_output(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.chat import render_prompt
    from engine.domains import get_domain
    from engine.generation import HFGenerator, SamplingParams
    from engine.rollout import rollout

    domain = get_domain("math")
    train, evals = domain.generate("train", 600, seed=0), domain.generate("eval", 4, seed=0)
    base = materialize_tiny(SPEC, tmp_path / "base", seed=0)
    tok = load_tokenizer(base)
    settings = SFTSettings(steps=60, batch_size=32, micro_batch_size=16, max_length=96, pack=True, lr=1e-2,
                           warmup_steps=5, eval_every=60, save_every=60, keep_last=1)
    trainer = build_trainer(with_overrides(TrainerSettings(), **settings.trainer_overrides()), base)
    result = run_sft(settings, trainer=trainer, tokenizer=tok, train_rows=train, out_dir=tmp_path / "sft")
    final = export_final(result["checkpoint"], tmp_path / "sft" / "final", tok)

    assert sorted(p.name for p in final.iterdir()) == sorted(
        ["config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "chat_template.jinja"])
    assert not list(tmp_path.glob("sft/.final.tmp*"))
    lm = AutoModelForCausalLM.from_pretrained(str(final)).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(final))
    assert hf_tok.decode(hf_tok("2 + 3 = 5")["input_ids"]) == "2 + 3 = 5"
    stage = HFGenerator(str(result["checkpoint"]), tok)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40)
    stopped = 0
    for row in evals:
        prompt = hf_tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True)["input_ids"]
        assert list(prompt) == render_prompt(row["messages"], tok)
        with torch.no_grad():
            out = lm.generate(torch.tensor([prompt]), max_new_tokens=40)[0, len(prompt):].tolist()
        traj = rollout(stage, [render_prompt(row["messages"], tok)], greedy, tokenizer=tok)[0]
        assert out == traj.response_ids
        stopped += traj.finish_reason == "stop"
    assert stopped >= 1  # the trained model ends its turn, and generate() stopped there too


def test_generation_config_lists_the_templates_end_of_turn(tmp_path):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from tests.unit.test_chat import LLAMA3_TEMPLATE, _byte_bpe

    tok = _byte_bpe(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                     "<|end_of_text|>"], "<|end_of_text|>", LLAMA3_TEMPLATE)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                         eos_token_id=tok.eos_token_id, bos_token_id=0, pad_token_id=0))
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "optimizer.pt").write_bytes(b"state")
    final = export_final(tmp_path / "ckpt", tmp_path / "final", tok)
    gen = GenerationConfig.from_pretrained(str(final))
    assert gen.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]
    assert not (final / "optimizer.pt").exists()
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
