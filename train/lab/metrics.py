r"""Metrics of the forgetting lab: token log-probs, KL to the base model, multiple-choice scoring and calibration.

Token-level functions take logits ``[B, T, V]``, work under ``jax.jit`` and return sums and counts (accumulate, divide
once); ``targets`` are already shifted, ``mask`` is a float weight. The masked NLL sum is
:func:`train.step.token_loss_sums`. Item-level functions take small NumPy arrays and return Python floats.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "TokenSums",
    "token_log_probs",
    "kl_sums",
    "perplexity",
    "MultipleChoiceResult",
    "score_multiple_choice",
    "expected_calibration_error",
    "brier_score",
]


class TokenSums(NamedTuple):
    """Sum of a per-token quantity over masked positions, and the total mask weight."""

    total: jax.Array
    count: jax.Array


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    r"""Log-probability of each target token, :math:`\log p(y_t \mid x_{<t})`, shape ``[B, T]``, float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> lp = token_log_probs(jnp.zeros((1, 1, 4)), jnp.array([[2]]))
      >>> round(float(lp[0, 0]), 6) == round(float(-jnp.log(4.0)), 6)
      True
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def kl_sums(base_logits: jax.Array, tuned_logits: jax.Array, mask: jax.Array) -> TokenSums:
    r"""Masked sum of per-position :math:`\mathrm{KL}(p_\text{base} \,\|\, p_\text{ft})` over the full vocabulary.

    .. math::
      \mathrm{KL}_{bt} = \sum_v p_\text{base}(v) \left(\log p_\text{base}(v) - \log p_\text{ft}(v)\right)

    Args:
      base_logits: logits of the base (pre-fine-tuning) model, ``[B, T, V]``.
      tuned_logits: logits of the fine-tuned model on the same tokens, ``[B, T, V]``.
      mask: ``[B, T]`` weights.

    Returns:
      :class:`TokenSums` whose ``total / count`` is the mean KL in nats per token.
    """
    base_log_probs = jax.nn.log_softmax(base_logits.astype(jnp.float32), axis=-1)
    tuned_log_probs = jax.nn.log_softmax(tuned_logits.astype(jnp.float32), axis=-1)
    per_position = jnp.sum(jnp.exp(base_log_probs) * (base_log_probs - tuned_log_probs), axis=-1)
    mask = mask.astype(jnp.float32)
    return TokenSums(total=jnp.sum(per_position * mask), count=jnp.sum(mask))


def perplexity(mean_nll: float) -> float:
    r"""Perplexity :math:`\exp(\overline{\text{NLL}})` from a mean negative log-likelihood in nats."""
    return float(np.exp(mean_nll))


class MultipleChoiceResult(NamedTuple):
    """Per-item outcome of scoring multiple-choice items by log-likelihood.

    Attributes:
      scores: ``[N, K]`` the (normalised) log-likelihood score of each choice.
      probs: ``[N, K]`` softmax of ``scores`` over the choices: the model's implied belief, used for calibration.
      predictions: ``[N]`` index of the highest-scoring choice.
      correct: ``[N]`` bool, prediction equals the label.
    """

    scores: np.ndarray
    probs: np.ndarray
    predictions: np.ndarray
    correct: np.ndarray

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.correct))


def score_multiple_choice(
    choice_log_likelihoods: np.ndarray,
    choice_lengths: np.ndarray,
    labels: np.ndarray,
    *,
    length_normalize: bool = True,
) -> MultipleChoiceResult:
    r"""Pick the answer of each item by (length-normalised) log-likelihood, as lm-eval-harness's ``acc_norm`` does.

    .. math::
      s_{ik} = \frac{\log p(c_{ik} \mid q_i)}{|c_{ik}|}, \qquad \hat y_i = \arg\max_k s_{ik}, \qquad
      \pi_{ik} = \frac{e^{s_{ik}}}{\sum_j e^{s_{ij}}}

    Without normalisation, long choices are penalised merely for having more tokens; dividing by the length (in
    whatever unit the caller counts: characters like lm-eval's ``acc_norm``, or tokens) removes that bias.

    Args:
      choice_log_likelihoods: ``[N, K]`` summed log-probability of each choice's tokens given the question.
      choice_lengths: ``[N, K]`` positive length of each choice.
      labels: ``[N]`` index of the correct choice.
      length_normalize: divide by the length (``True``) or use the raw sum (``False``).

    Returns:
      A :class:`MultipleChoiceResult`.

    Examples:
      >>> import numpy as np
      >>> ll = np.array([[-4.0, -3.0]]); lengths = np.array([[4, 1]])
      >>> int(score_multiple_choice(ll, lengths, np.array([0])).predictions[0])
      0
      >>> int(score_multiple_choice(ll, lengths, np.array([0]), length_normalize=False).predictions[0])
      1
    """
    ll = np.asarray(choice_log_likelihoods, dtype=np.float64)
    lengths = np.asarray(choice_lengths, dtype=np.float64)
    labels = np.asarray(labels)
    if ll.ndim != 2 or ll.shape != lengths.shape or labels.shape != ll.shape[:1]:
        raise ValueError(
            f"score_multiple_choice: shapes must be [N, K], [N, K], [N]; got {ll.shape}, {lengths.shape}, "
            f"{labels.shape}"
        )
    if np.any(lengths <= 0):
        raise ValueError("score_multiple_choice: every choice length must be positive")
    scores = ll / lengths if length_normalize else ll
    shifted = scores - scores.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    predictions = scores.argmax(axis=1)
    return MultipleChoiceResult(scores=scores, probs=probs, predictions=predictions, correct=predictions == labels)


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray, num_bins: int = 10) -> float:
    r"""Expected calibration error with ``num_bins`` equal-width confidence bins.

    .. math::
      \mathrm{ECE} = \sum_{b=1}^{B} \frac{|S_b|}{N} \left| \mathrm{acc}(S_b) - \mathrm{conf}(S_b) \right|

    Bin :math:`b` holds confidences in :math:`((b-1)/B, b/B]` (the first bin also holds 0).

    Args:
      confidences: ``[N]`` probability the model gave its own prediction, in ``[0, 1]``.
      correct: ``[N]`` whether each prediction was right.
      num_bins: number of bins, at least 1.

    Returns:
      ECE in ``[0, 1]``.

    Examples:
      >>> round(expected_calibration_error(np.array([0.9, 0.9]), np.array([True, False]), num_bins=10), 6)
      0.4
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidences.shape != correct.shape or confidences.ndim != 1 or confidences.size == 0:
        raise ValueError(
            f"expected_calibration_error: need two equal non-empty 1-D arrays, got {confidences.shape}, {correct.shape}"
        )
    if num_bins < 1:
        raise ValueError(f"expected_calibration_error: num_bins must be >= 1, got {num_bins}")
    # ceil(c * B) - 1 puts c in ((b-1)/B, b/B]; clip sends c == 0 to the first bin.
    bins = np.clip(np.ceil(confidences * num_bins).astype(int) - 1, 0, num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidences[in_bin].mean())
    return float(ece)


def brier_score(probs: np.ndarray, labels: np.ndarray) -> float:
    r"""Multi-class Brier score: mean over items of the squared distance to the one-hot label.

    .. math::
      \mathrm{BS} = \frac{1}{N} \sum_i \sum_k \left(\pi_{ik} - [k = y_i]\right)^2

    0 is perfect, a uniform guess over :math:`K` choices scores :math:`1 - 1/K`.

    Examples:
      >>> brier_score(np.array([[0.25, 0.25, 0.25, 0.25]]), np.array([0]))
      0.75
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"brier_score: shapes must be [N, K] and [N], got {probs.shape}, {labels.shape}")
    one_hot = np.eye(probs.shape[1])[labels]
    return float(np.mean(np.sum((probs - one_hot) ** 2, axis=1)))
