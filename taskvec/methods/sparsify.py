"""Sparsifying task vectors chunk by chunk, as mergekit's `sparsify` composes them with a consensus:
TIES's magnitude top-k (exact thresholds from a streaming pre-pass) and DARE's random drop (a
counter-based mask).

Magnitude (TIES). Per tensor and per input i, keep the k = max(1, int(density * numel)) entries of
largest |tau_i| (mergekit's rule). The k-th largest is found exactly by radix selection on the
float32 bit pattern of |tau_i| (a non-negative float's bits, read as an int32, order like the float):

    pass 1: a 65536-bucket histogram of the upper 16 bits -> the bucket holding the k-th largest,
            and how many of the k lie above it;
    pass 2: a 65536-bucket histogram of the lower 16 bits of the entries in that bucket -> the
            exact threshold key T, and r: how many entries equal to T are kept.

Entries with key > T are kept, and of those equal to T the r with the lowest element indices
(the merge pass counts them in element order, which every chunking visits in the same order), so
the result does not depend on the chunk size. A tensor that one chunk holds whole is selected in
that chunk directly (torch.kthvalue), in pass 1. Memory: two 65536-entry int64 histograms (512 KiB
each) per input for each tensor that is split across chunks and not finished (at most two at a
time), i.e. <= 2 * N * 512 KiB, plus the (T, r) pair per tensor and input; never a whole tensor.
float64 inputs are ranked by |tau| rounded to float32 (ties at that resolution go by index).

Random (DARE). Entry j of input i of tensor `name` is kept iff u < int(density * 2**32), where

    key = splitmix64(splitmix64(seed << 32 | crc32(name)) ^ i)
    u   = splitmix64(key + j) >> 32          (splitmix64: add 0x9E3779B97F4A7C15, then mix)

computed with wrapping int64 torch ops: a function of (seed, input, tensor, element index) alone,
the same on any device, chunk size or order of work.
"""

from __future__ import annotations

import zlib

import torch

GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK64 = 2**64 - 1
BUCKETS = 1 << 16


def _signed(value: int) -> int:
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def splitmix64(x: int) -> int:
    """The scalar splitmix64 step (Steele et al.), Python ints mod 2**64."""
    z = (x + GOLDEN) & MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, name: str, index: int) -> int:
    return splitmix64(splitmix64(((seed & 0xFFFFFFFF) << 32) | zlib.crc32(name.encode())) ^ index)


def random_words(seed: int, name: str, index: int, start: int, numel: int, device) -> torch.Tensor:
    """u (int64 in [0, 2**32)) for elements start..start+numel of input `index` of tensor `name`."""
    z = torch.arange(start, start + numel, dtype=torch.int64, device=device)
    z.add_(_signed(stream_key(seed, name, index) + GOLDEN))
    t = torch.empty_like(z)
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)  # a logical shift: torch shifts int64 arithmetically
        z.bitwise_xor_(t)
        if mult is not None:
            z.mul_(_signed(mult))  # wraps mod 2**64
    torch.bitwise_right_shift(z, 32, out=t)
    return t.bitwise_and_(0xFFFFFFFF)


def random_keep(seed: int, name: str, index: int, start: int, numel: int, density: float, device) -> torch.Tensor:
    """DARE's keep mask (bool) of one chunk: each entry kept with probability density."""
    return random_words(seed, name, index, start, numel, device) < int(density * 2**32)


def dare_drop(tau: torch.Tensor, keep: torch.Tensor, density: float) -> torch.Tensor:
    """tau with the dropped entries zeroed and the kept ones rescaled by 1/density (in place)."""
    return tau.mul_(keep).div_(density)


def magnitude_key(tau: torch.Tensor) -> torch.Tensor:
    """|tau| as order-preserving int32 keys (its float32 bit pattern, sign cleared)."""
    magnitude = tau.abs()
    if magnitude.dtype != torch.float32:
        magnitude = magnitude.to(torch.float32)
    return magnitude.view(torch.int32)


def top_k_count(density: float, numel: int) -> int:
    """mergekit's `magnitude`: k = max(1, int(density * numel)) entries kept."""
    return max(1, int(density * numel))


class MagnitudeThresholds:
    """Per (tensor, input): the exact threshold of the k largest |tau_i| (see the module doc).

    Driven by the executor: `passes` streaming passes of `update()` over every chunk `wants()`,
    then the merge pass asks `keep()` for each chunk, in element order.
    """

    passes = 2

    def __init__(self, density: float) -> None:
        self.density = density
        self.thresholds: dict[tuple[str, int], tuple[int, int | None]] = {}  # (T, r); r None: all of T
        self._bucket: dict[tuple[str, int], tuple[int, int]] = {}  # (upper bits B, how many in B)
        self._hist: dict[tuple[str, int], torch.Tensor] = {}
        self._seen: dict[tuple[str, int], int] = {}

    def wants(self, pass_number: int, name: str) -> bool:
        return pass_number == 0 or any(key[0] == name for key in self._bucket)

    def update(self, pass_number: int, name: str, start: int, numel: int, index: int, tau: torch.Tensor) -> None:
        """Chunk tau (elements start.. of a tensor of `numel`) of fine-tune `index`."""
        slot = (name, index)
        k = top_k_count(self.density, numel)
        last = start + tau.numel() == numel
        if pass_number == 0:
            if tau.numel() == numel:  # the whole tensor is here: select directly
                key = magnitude_key(tau)
                threshold = int(torch.kthvalue(key.cpu(), numel - k + 1).values)
                above = int((key > threshold).sum())
                self._set(slot, threshold, k - above, int((key == threshold).sum()))
                return
            hist = self._histogram(slot, tau.device)
            if tau.device.type == "cpu":
                from taskvec.methods.key_counts import count_high  # numba: only for a TIES merge

                count_high(tau, hist)
            else:
                hist += torch.bincount(magnitude_key(tau) >> 16, minlength=BUCKETS)
            if last:
                bucket, within = _from_top(self._hist.pop(slot), k)
                self._bucket[slot] = (bucket, within)
        elif slot in self._bucket:
            bucket, within = self._bucket[slot]
            hist = self._histogram(slot, tau.device)
            if tau.device.type == "cpu":
                from taskvec.methods.key_counts import count_low

                count_low(tau, bucket, hist)
            else:
                key = magnitude_key(tau)
                hist += torch.bincount(key[(key >> 16) == bucket] & 0xFFFF, minlength=BUCKETS)
            if last:
                hist = self._hist.pop(slot)
                low, take = _from_top(hist, within)
                del self._bucket[slot]
                self._set(slot, (bucket << 16) | low, take, int(hist[low]))

    def _histogram(self, slot, device: torch.device) -> torch.Tensor:
        """The slot's 65536-bucket histogram (on a CPU counted by compiled loops, key_counts)."""
        hist = self._hist.get(slot)
        if hist is None:
            hist = self._hist[slot] = torch.zeros(BUCKETS, dtype=torch.int64, device=device)
        return hist

    def _set(self, slot, threshold: int, take: int, equal: int) -> None:
        # All entries equal to T kept, or T == 0 (+0.0): zeros take part in neither the sign
        # election nor the disjoint mean, so which of them count as kept changes nothing.
        self.thresholds[slot] = (threshold, None if take == equal or threshold == 0 else take)

    def begin_merge(self) -> None:
        self._seen.clear()

    def keep(self, name: str, index: int, tau: torch.Tensor) -> torch.Tensor:
        """The keep mask of the next chunk of (name, index); chunks must come in element order."""
        key = magnitude_key(tau)
        threshold, take = self.thresholds[(name, index)]
        if take is None:
            return key >= threshold
        keep = key > threshold
        equal = key == threshold
        seen = self._seen.get((name, index), 0)
        if seen < take:
            rank = torch.cumsum(equal, 0).add_(seen)  # 1-based rank among entries equal to T
            keep |= equal & (rank <= take)
        self._seen[(name, index)] = seen + int(equal.sum())
        return keep

    def keep_rule(self, name: str, index: int, numel: int, tau) -> tuple[int, int]:
        """`keep()` as a rule for a fused kernel: (T, c) such that entry p of the next chunk of
        (name, index), of `numel` entries, is kept iff key > T, or key == T and p <= c. `tau()`
        gives the chunk's float32 tau; it is called only when the ties at T are split in this
        chunk (else no tau is needed). Advances the same count of ties as `keep()`."""
        threshold, take = self.thresholds[(name, index)]
        if take is None:
            return threshold, numel
        seen = self._seen.get((name, index), 0)
        if seen >= take:  # the quota is full: the count no longer matters
            return threshold, -1
        equal = magnitude_key(tau()) == threshold
        positions = torch.nonzero(equal).flatten()
        self._seen[(name, index)] = seen + positions.numel()
        return threshold, numel if seen + positions.numel() <= take else int(positions[take - seen - 1])


def _from_top(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bucket b holding the k-th largest entry and how many of the k fall into b."""
    above = torch.cumsum(hist.flip(0), 0)  # above[i]: entries in buckets >= BUCKETS - 1 - i
    position = int(torch.searchsorted(above, torch.tensor(k, dtype=above.dtype, device=above.device)))
    bucket = BUCKETS - 1 - position
    before = int(above[position - 1]) if position > 0 else 0
    return bucket, k - before
