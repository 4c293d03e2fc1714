r"""Metrics of the forgetting lab: token log-probs, KL to the base model, multiple-choice scoring and calibration.

Token-level functions take logits ``[B, T, V]``, work under ``jax.jit`` and return per-token values ``[B, T]``
(the caller masks and sums them per example); ``targets`` are already shifted. Item-level functions take small
NumPy arrays and return Python floats.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "token_log_probs",
    "token_kl",
    "perplexity",
    "MultipleChoiceResult",
    "score_multiple_choice",
    "expected_calibration_error",
    "brier_score",
]


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


def token_kl(base_log_probs: jax.Array, tuned_logits: jax.Array) -> jax.Array:
    r"""Per-position :math:`\mathrm{KL}(p_\text{base} \,\|\, p_\text{ft})` over the full vocabulary, ``[B, T]``.

    .. math::
      \mathrm{KL}_{bt} = \sum_v p_\text{base}(v) \left(\log p_\text{base}(v) - \log p_\text{ft}(v)\right)

    Args:
      base_log_probs: log-softmax of the base (pre-fine-tuning) model, ``[B, T, V]`` (computed once and kept: the
        base model's forward pass is as expensive as the fine-tuned one's).
      tuned_logits: logits (or log-probs) of the fine-tuned model on the same tokens, ``[B, T, V]``.
    """
    base_log_probs = base_log_probs.astype(jnp.float32)
    tuned_log_probs = jax.nn.log_softmax(tuned_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(base_log_probs) * (base_log_probs - tuned_log_probs), axis=-1)


def perplexity(mean_nll: float) -> float:
    r"""Perplexity :math:`\exp(\overline{\text{NLL}})` from a mean negative log-likelihood in nats."""
    return float(np.exp(mean_nll))


class MultipleChoiceResult(NamedTuple):
    r"""Per-item outcome of scoring multiple-choice items by log-likelihood.

    Attributes:
      scores: ``[N, K]`` the (length-normalised) log-likelihood score of each choice: what accuracy ranks by.
      probs: ``[N, K]`` the model's own probability of each choice, normalised over the choices:
        :math:`p(c_k \mid q) / \sum_j p(c_j \mid q)`. Calibration (ECE, Brier) is measured on these.
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
      \pi_{ik} = \frac{p(c_{ik} \mid q_i)}{\sum_j p(c_{ij} \mid q_i)}

    Without normalisation, long choices are penalised merely for having more tokens; dividing by the length (in
    whatever unit the caller counts: characters like lm-eval's ``acc_norm``, or tokens) removes that bias. The
    probabilities :math:`\pi` are not normalised by length: they are the model's own belief among the choices.

    Args:
      choice_log_likelihoods: ``[N, K]`` summed log-probability of each choice's tokens given the question.
      choice_lengths: ``[N, K]`` positive length of each choice.
      labels: ``[N]`` index of the correct choice.
      length_normalize: rank by the normalised score (``True``) or by the raw sum (``False``).

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
    shifted = ll - ll.max(axis=1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    predictions = scores.argmax(axis=1)
    return MultipleChoiceResult(scores=scores, probs=probs, predictions=predictions, correct=predictions == labels)


def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, num_bins: int = 10, min_per_bin: int = 10
) -> float:
    r"""Expected calibration error over equal-count confidence bins.

    .. math::
      \mathrm{ECE} = \sum_{b=1}^{B} \frac{|S_b|}{N} \left| \mathrm{acc}(S_b) - \mathrm{conf}(S_b) \right|

    The items, sorted by confidence, are cut into :math:`B = \min(\text{num\_bins}, \lfloor N /
    \text{min\_per\_bin} \rfloor)` bins of (near) equal size, so every bin holds at least ``min_per_bin`` items:
    equal-width bins leave most bins empty or holding one or two items on small sets, and then the ECE measures
    noise.

    Args:
      confidences: ``[N]`` probability the model gave its own prediction, in ``[0, 1]``.
      correct: ``[N]`` whether each prediction was right.
      num_bins: the most bins, at least 1.
      min_per_bin: fewer bins when there are not this many items per bin.

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
    if num_bins < 1 or min_per_bin < 1:
        raise ValueError(
            f"expected_calibration_error: num_bins and min_per_bin must be >= 1, got {num_bins}, {min_per_bin}"
        )
    bins = max(1, min(num_bins, confidences.size // min_per_bin))
    order = np.argsort(confidences, kind="stable")
    ece = 0.0
    for idx in np.array_split(order, bins):
        ece += idx.size / confidences.size * abs(correct[idx].mean() - confidences[idx].mean())
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
