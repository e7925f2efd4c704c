"""The count-weighted normalizer merge equals the statistics of the concatenated data."""
import torch

from p2prl.comm import LocalComm
from p2prl.normalize import RunningNormalizer, merge_moments, moments_of
from p2prl.sync.stats import global_moments


def test_merge_equals_concatenated():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(37, 3, generator=g, dtype=torch.float64) * 4 + 2
    b = torch.randn(5, 3, generator=g, dtype=torch.float64) - 7
    m = merge_moments(moments_of(a), moments_of(b))
    both = torch.cat([a, b])
    assert float(m.count) == 42
    assert torch.allclose(m.mean, both.mean(0))
    assert torch.allclose(m.m2 / m.count, both.var(0, unbiased=False))


def test_merge_with_empty_is_identity():
    a = torch.randn(10, 2, dtype=torch.float64)
    empty = moments_of(torch.zeros(0, 2))
    m = merge_moments(empty, moments_of(a))
    assert torch.allclose(m.mean, a.mean(0)) and float(m.count) == 10


def test_running_normalizer_normalizes_after_updates():
    norm = RunningNormalizer((2,))
    g = torch.Generator().manual_seed(2)
    data = [torch.randn(100, 2, generator=g) * torch.tensor([3.0, 0.5]) + torch.tensor([5.0, -1.0])
            for _ in range(5)]
    for x in data:
        (m,) = global_moments(LocalComm(), moments_of(x))
        norm.update(m)
    y = norm(torch.cat(data))
    assert torch.allclose(y.mean(0), torch.zeros(2), atol=1e-4)
    assert torch.allclose(y.std(0, unbiased=False), torch.ones(2), atol=1e-3)


def test_observing_tensors_or_arrays_gives_float64_statistics_rounded_once_to_float32():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(n, 3, generator=g) * 3 + 1 for n in (1, 4, 1, 2)]
    from_tensors, from_arrays = RunningNormalizer((3,)), RunningNormalizer((3,))
    for x in batches:
        from_tensors.observe(x)
        from_arrays.observe(x.numpy())
        assert torch.equal(from_tensors.mean, from_arrays.mean) and torch.equal(from_tensors.std, from_arrays.std)
    seen = moments_of(torch.cat(batches))  # float64
    assert from_tensors.mean.dtype == torch.float32 and from_tensors.mean.shape == (3,)
    assert torch.equal(from_tensors.mean, seen.mean.float())
    assert torch.allclose(from_tensors.std.double(), torch.sqrt(seen.m2 / seen.count + 1e-8), rtol=1e-6)


def test_statistics_are_used_only_after_they_have_seen_the_data(compose):
    """Observation and reward normalization include each step's data before normalizing it (as SB3's
    VecNormalize), from the first rollout on; the peers' statistics are merged after each rollout."""
    import numpy as np

    from p2prl.runner import build_algorithm
    n, T = 4, 32
    cfg = compose("algo=ppo", "env=pendulum", f"algo.num_envs={n}", f"algo.num_steps={T}", "algo.num_minibatches=1",
                  "algo.norm_obs=true", "algo.norm_reward=true")
    algo = build_algorithm(cfg, LocalComm())
    raw_rewards, step = [], algo.collector.envs.step

    def recording(actions):
        out = step(actions)
        raw_rewards.append(np.asarray(out[1], dtype=np.float64))
        return out
    algo.collector.envs.step = recording
    algo.sample(0.0)
    r = algo.rollout
    assert bool(r.valid.all())  # Pendulum's episodes are 200 steps: none ends here
    seen, returns, g = [], [], np.zeros(n)
    for t in range(T):
        raw = r.raw_obs[t].numpy().astype(np.float64)
        seen.append(raw)
        x = np.concatenate(seen)
        want = np.clip((raw - x.mean(0)) / np.sqrt(x.var(0) + 1e-8), -10, 10)
        np.testing.assert_allclose(r.obs[t].numpy(), want, atol=1e-4, err_msg=f"observations at step {t}")
        g = g * cfg.algo.gamma + raw_rewards[t]
        returns.append(g.copy())
        want_r = raw_rewards[t] / np.sqrt(np.concatenate(returns).var() + 1e-8)
        np.testing.assert_allclose(r.rewards[t].numpy(), want_r, rtol=1e-4, err_msg=f"rewards at step {t}")
    algo.learn(0.0)  # merges what this (only) peer saw into the shared statistics
    assert float(algo.obs_norm.stats.count) == n * T and float(algo.scale.norm.stats.count) == n * T
    np.testing.assert_allclose(algo.obs_norm.stats.mean.numpy(), np.concatenate(seen).mean(0), rtol=1e-9)


def test_clip_reward_bounds_the_scaled_rewards(compose):
    from p2prl.runner import build_algorithm
    cfg = compose("algo=ppo", "env=pendulum", "algo.num_envs=2", "algo.num_steps=16", "algo.num_minibatches=1",
                  "algo.norm_reward=true", "algo.clip_reward=0.5")
    algo = build_algorithm(cfg, LocalComm())
    algo.sample(0.0)
    assert float(algo.rollout.rewards.abs().max()) == 0.5  # Pendulum's first scaled rewards exceed 0.5
