"""The policy eval runs: a local generator rolling out a domain's eval rows."""

from __future__ import annotations

from pipeline.stage_domains import domain_environment
from pipeline.stage_io import stage_tokenizer


def eval_policy(cfg, model_dir: str):
    """A policy `(eval_set, rows, temperature, n) -> texts` backed by a local HF generator."""
    from engine.chat import render_row_prompt, tool_call_end_id
    from engine.generation import SamplingParams, build_generator
    from engine.rollout import rollout

    tokenizer = stage_tokenizer(cfg, model_dir)
    generator = build_generator(cfg.generator, model_dir, tokenizer=tokenizer, dtype=cfg.model.dtype)

    def policy(es, rows, temperature, n):
        from engine.modes import split_route

        domain, _ = split_route(es.domain)  # `math@think-high`: the math domain in one mode
        env = domain_environment(cfg, domain, rows, tokenizer)
        sampling = SamplingParams(n=n, temperature=temperature,
                                  max_new_tokens=es.max_new_tokens or cfg.eval.max_new_tokens,
                                  stop_token_ids=[tool_call_end_id(tokenizer)] if env is not None else [],
                                  seed=cfg.seed)
        prompts = [render_row_prompt(r, tokenizer) for r in rows]
        max_turns = cfg.domain(domain).grpo.max_turns if env is not None else 1
        trajs = rollout(generator, prompts, sampling, tokenizer=tokenizer, environment=env, max_turns=max_turns)
        return [t.text for t in trajs], [sum(t.response_mask) for t in trajs]  # texts, output tokens

    policy.close = generator.close  # evaluate_models releases each model before the next
    return policy
