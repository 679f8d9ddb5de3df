"""Alignment: GRPO in staged, weighted reward stages, continuing from the SFT adapter.

**This is GRPO, not PPO.** The system we replace tuned with PPO in two reward stages. TRL 1.16
ships no ``PPOTrainer`` (neither in ``trl`` nor ``trl.experimental``), so this stage uses TRL's
``GRPOTrainer``, which optimises PPO's clipped surrogate objective

    L = -E[min(r_t * A, clip(r_t, 1 - eps, 1 + eps) * A)] + beta * KL(pi || pi_ref)

with a *group-relative* baseline instead of a learned value network: each prompt is sampled
``num_generations`` times and a completion's advantage is its reward minus the group's mean
reward (divided by the group's std with ``scale_rewards=group``). How the old recipe maps:

=============================  ==============================================================
old PPO recipe                 here (``align`` config section)
=============================  ==============================================================
stage 1: judge-scored          stage ``instruction``: reward ``judge`` (OpenAI-compatible judge
instruction quality            endpoint, :mod:`tasks.judge`; rule-based score offline/fallback)
stage 2: 0.5 sentiment F1 +    stage ``tasks``: ``sentiment`` 0.5, ``ner`` 0.3, ``instruction``
0.3 NER recall + 0.2 instr.    0.2 (``ner_recall`` is available for the recall-only variant)
dynamic ratio                  ``weight_schedule: saturation`` moves weight off saturated rewards
                               between steps (:class:`tasks.rewards.WeightSchedule`)
reward clipping                ``reward_clip`` (each reward clipped before weighting)
dynamic baseline (value net)   group mean of ``num_generations`` samples per prompt
PPO clip range                 ``clip_epsilon`` (TRL ``epsilon``)
KL penalty to reference        ``kl_beta``; reference = the adapter the stage starts from
PPO epochs per batch           ``num_iterations`` (1 = on-policy; ratio 1, clip inactive)
=============================  ==============================================================

The policy is the imported base (NF4 4-bit when the SFT run used ``qlora``) with the SFT adapter
loaded as the trainable PEFT adapter; TRL keeps a frozen copy of it as the ``ref`` adapter for
the KL term. Stages run in order, each from the previous stage's adapter.

Modules: :mod:`.data` (prompts per stage), :mod:`.trainer` (policy, GRPOConfig, the per-step
callback, :func:`~tasks.align.trainer.train_stages`), :mod:`.tracking` (MLflow), :mod:`.run`
(run directories, Prefect tasks). The flow is :mod:`flows.align`; docs/ALIGNMENT.md has the how-to.
"""
