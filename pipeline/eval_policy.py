"""The policy eval runs: a local generator rolling out a domain's eval rows."""

from __future__ import annotations

from pipeline.stage_domains import domain_environment
from pipeline.stage_io import stage_tokenizer


def eval_policy(cfg, model_dir: str):
    """A policy `(eval_set, rows, temperature, n) -> (texts, output tokens)` backed by a
    local HF generator, rolling out through `engine.episode.roll_out` as training does."""
    from engine.domain_spec import DomainSpec
    from engine.episode import roll_out
    from engine.generation import build_generator

    tokenizer = stage_tokenizer(cfg, model_dir)
    generator = build_generator(cfg.generator, model_dir, tokenizer=tokenizer, dtype=cfg.model.dtype)

    def policy(es, rows, temperature, n):
        from engine.modes import split_route

        domain, _ = split_route(es.domain)  # `math@think-high`: the math domain in one mode
        env = domain_environment(cfg, domain, rows, tokenizer)
        samples = roll_out(rows, es.domain, DomainSpec(verifier=es.verifier, environment=env), generator=generator,
                           tokenizer=tokenizer, n=n, temperature=temperature,
                           max_new_tokens=es.max_new_tokens or cfg.eval.max_new_tokens,
                           max_turns=cfg.domain(domain).grpo.max_turns if env is not None else 1, seed=cfg.seed)
        # the completion as rewards read it (the prompt's open reasoning marker in front, where it wrote one)
        return [s.scored_text for s in samples], [s.num_model_tokens for s in samples]

    policy.close = generator.close  # evaluate_models releases each model before the next
    return policy
