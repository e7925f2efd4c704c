"""SAC and TD3: losses against hand-computed cases, the critics detached in the actor's loss, TD3's
delayed actor step, 2 peers on half batches == 1 peer on the whole, bit-identical peers, exact resume."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from p2prl import checkpoint
from p2prl.comm import LocalComm, open_comm, parameter_digest
from p2prl.data import ReplayBatch
from p2prl.runner import build_algorithm, run

pytestmark = pytest.mark.timeout(180)
SMALL = ("env=pendulum", "seed=3", "algo.learning_starts=64", "algo.batch_size=16", "algo.buffer_size=2000",
         "algo.hidden_sizes=[16,16]", "algo.train_freq=1", "algo.gradient_steps=1", "comm.timeout_s=30")
LOG_2PI = math.log(2 * math.pi)


@pytest.fixture
def small(compose):
    """`small(algo, *overrides)`: a small SAC or TD3 config on Pendulum."""
    return lambda algo, *overrides: compose(f"algo={algo}", *SMALL, *overrides)


def _set(module: torch.nn.Module, **values: float) -> None:
    """Every weight of `module` 0, every bias 0 unless named (by the path of its Linear) in `values`."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.fill_(values.get(name.rsplit(".", 1)[0], 0.0) if name.endswith("bias") else 0.0)


def _batch(n: int = 4, seed: int = 0) -> ReplayBatch:
    g = torch.Generator().manual_seed(seed)
    return ReplayBatch(obs=torch.randn(n, 3, generator=g), actions=torch.rand(n, 1, generator=g) * 2 - 1,
                       rewards=torch.randn(n, generator=g), next_obs=torch.randn(n, 3, generator=g),
                       discounts=torch.full((n,), 0.9), terminated=(torch.arange(n) % 3 == 2).float())


def test_sac_losses_hand_computed(small):
    algo = build_algorithm(small("sac", "algo.hidden_sizes=[]", "algo.alpha_init=0.5"), LocalComm())
    m = algo.model
    # Actor: mean 0, log std 5 (clamped to 2); critics: q1 = 1, q2 = 2 everywhere (zero weights).
    _set(m.actor, log_std=5.0)
    _set(m.critics, **{"q1.0": 1.0, "q2.0": 2.0})
    algo.target_flat.copy_(algo.flat[algo.segments["critics"]])
    b = _batch()
    noise = (torch.full((4, 1), -0.25), torch.full((4, 1), 0.5))
    loss, terms = algo.loss(b, noise)

    def log_prob(eps: float) -> float:  # of tanh(2 * eps): log N(u; 0, e^2) at u = e^2 * eps, then the squashing
        a = math.tanh(math.exp(2.0) * eps)
        return -0.5 * eps ** 2 - 2.0 - 0.5 * LOG_2PI - math.log(1 - a * a + 1e-6)
    alpha, now, nxt = 0.5, log_prob(-0.25), log_prob(0.5)
    y = b.rewards + 0.9 * (1 - b.terminated) * (1.0 - alpha * nxt)  # min(q1, q2) = 1 at any action
    want_critic = 0.5 * (((1 - y) ** 2).mean() + ((2 - y) ** 2).mean())
    assert terms["loss_critic"].item() == pytest.approx(want_critic.item(), rel=1e-5)
    assert terms["loss_actor"].item() == pytest.approx(alpha * now - 1.0, rel=1e-5)
    assert terms["loss_alpha"].item() == pytest.approx(-math.log(alpha) * (now - 1.0), rel=1e-5)  # target entropy -1
    assert terms["entropy"].item() == pytest.approx(-now, rel=1e-5) and terms["alpha"].item() == pytest.approx(alpha)
    assert loss.item() == pytest.approx(want_critic.item() + alpha * now - 1.0 - math.log(alpha) * (now - 1.0), rel=1e-5)
    # The temperature's gradient: d/dlog_alpha of -log_alpha (log pi + target entropy); its other uses are detached.
    (grad,) = torch.autograd.grad(loss, [m.log_alpha])
    assert grad.item() == pytest.approx(-(now - 1.0), rel=1e-5)


def test_actor_loss_reads_the_critics_detached(small):
    algo = build_algorithm(small("sac"), LocalComm())
    b = _batch()
    actions = b.actions.clone().requires_grad_(True)
    critics = list(algo.model.critics.parameters())
    q = algo.critics_detached(b.obs, actions)
    assert all(torch.equal(x, y) for x, y in zip(q, algo.model.critics(b.obs, b.actions)))
    grads = torch.autograd.grad(q[0].sum() + q[1].sum(), [actions, *critics], allow_unused=True)
    assert grads[0].abs().sum() > 0 and all(g is None for g in grads[1:])  # through the action only
    # It reads the online parameters themselves: an update shows through.
    for _ in range(70):
        algo.sample(0.5)
        algo.learn(0.5)
    assert algo.learner.updates > 0
    assert all(torch.equal(x, y) for x, y in zip(algo.critics_detached(b.obs, b.actions), algo.model.critics(b.obs, b.actions)))


def test_sac_gradients_equal_sb3s_on_the_same_parameters_batch_and_noise(small, monkeypatch):
    """One update's gradients against Stable-Baselines3's SAC (its train step, written out with its modules)
    from the same parameters, minibatch and reparameterization noise: the critics', the temperature's, and
    the actor's through the critics before their step: the one-step update (`algo.actor_after_critics=false`,
    all three gradients in one all-reduce). SB3 steps the critics first, as the default does (next test)."""
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.sac.policies import SACPolicy
    algo = build_algorithm(small("sac", "algo.alpha_init=0.7"), LocalComm())
    m = algo.model
    sb = SACPolicy(algo.collector.observation_space, algo.collector.action_space, lambda _: 3e-4, net_arch=[16, 16])

    def linears(module):
        return [x for x in module.modules() if isinstance(x, torch.nn.Linear)]
    pairs = [(m.actor.trunk, sb.actor.latent_pi), (m.actor.mean, sb.actor.mu), (m.actor.log_std, sb.actor.log_std),
             (m.critics.q1, sb.critic.qf0), (m.critics.q2, sb.critic.qf1),
             (algo.target.q1, sb.critic_target.qf0), (algo.target.q2, sb.critic_target.qf1)]
    with torch.no_grad():
        algo.target_flat.add_(0.05)  # targets apart from the online critics, as after some updates
        for ours, theirs in pairs:
            assert len(linears(ours)) == len(linears(theirs)) > 0
            for a, b in zip(linears(ours), linears(theirs)):
                b.weight.copy_(a.weight), b.bias.copy_(a.bias)
    log_alpha = m.log_alpha.detach().clone().requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    n = 32
    b = ReplayBatch(obs=torch.randn(n, 3, generator=g), actions=torch.rand(n, 1, generator=g) * 2 - 1,
                    rewards=torch.randn(n, generator=g), next_obs=torch.randn(n, 3, generator=g),
                    discounts=torch.full((n,), 0.99), terminated=(torch.rand(n, generator=g) < 0.3).float())
    noise = torch.randn(2, n, 1, generator=g)

    loss, terms = algo.loss(b, (noise[0], noise[1]))
    loss.backward()

    # SB3's train step: its Gaussians draw the same noise (at s first, then at s').
    draws = [noise[0], noise[1]]
    monkeypatch.setattr(torch.distributions.Normal, "rsample",
                        lambda self, shape=torch.Size(): self.loc + self.scale * draws.pop(0))
    actions_pi, log_prob = sb.actor.action_log_prob(b.obs)
    log_prob = log_prob.reshape(-1, 1)
    alpha = log_alpha.detach().exp()
    (-(log_alpha * (log_prob + -1.0).detach()).mean()).backward()  # target entropy: -1 action dimension
    with torch.no_grad():
        next_actions, next_log_prob = sb.actor.action_log_prob(b.next_obs)
        next_q = torch.min(torch.cat(sb.critic_target(b.next_obs, next_actions), 1), 1, keepdim=True)[0]
        y = b.rewards[:, None] + (1 - b.terminated[:, None]) * 0.99 * (next_q - alpha * next_log_prob[:, None])
    critic_loss = 0.5 * sum(F.mse_loss(q, y) for q in sb.critic(b.obs, b.actions))
    critic_loss.backward()
    critic_grads = [p.grad.clone() for p in sb.critic.parameters()]
    actor_loss = (alpha * log_prob - torch.min(torch.cat(sb.critic(b.obs, actions_pi), 1), 1, keepdim=True)[0]).mean()
    actor_loss.backward()
    assert not draws
    assert terms["loss_critic"].item() == pytest.approx(critic_loss.item(), rel=1e-5)
    assert terms["loss_actor"].item() == pytest.approx(actor_loss.item(), rel=1e-5)
    for ours, theirs in pairs[:3]:
        for a, b_ in zip(linears(ours), linears(theirs)):
            torch.testing.assert_close(a.weight.grad, b_.weight.grad, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(a.bias.grad, b_.bias.grad, rtol=1e-4, atol=1e-6)
    ours = torch.cat([p.grad.reshape(-1) for p in m.critics.parameters()])
    torch.testing.assert_close(ours, torch.cat([x.reshape(-1) for x in critic_grads]), rtol=1e-4, atol=1e-6)
    assert ours.abs().max() > 0
    torch.testing.assert_close(m.log_alpha.grad, log_alpha.grad, rtol=1e-5, atol=1e-7)


def test_sac_in_order_steps_the_actor_through_the_critics_new_parameters(small):
    """`algo.actor_after_critics` (SB3's order): the critics and temperature step exactly as in the one-step
    update; the actor's gradient is the one through the critics AFTER their step, not before; one update counted."""
    together = build_algorithm(small("sac", "algo.actor_after_critics=false"), LocalComm())
    ordered = build_algorithm(small("sac"), LocalComm())

    def named(algo) -> dict[str, torch.Tensor]:  # the bucket's layouts differ: compare by name
        return {k: v.detach().clone() for k, v in algo.model.state_dict().items()}
    before = named(ordered)
    assert named(together).keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in named(together).items())
    b, noise = _batch(16), tuple(torch.randn(2, 16, 1, generator=torch.Generator().manual_seed(2)))
    together.learner.step(*together.loss(b, noise))
    update = ordered.update_in_order(b, noise)
    assert update.applied and ordered.learner.updates == ordered.learner.attempts == 1
    one, two = named(together), named(ordered)
    for k in before:
        if not k.startswith("actor."):
            assert torch.equal(one[k], two[k]) and not torch.equal(two[k], before[k]), k
    assert update.terms["loss_critic"] == pytest.approx(together.learner.take_means()["loss_critic"])
    # The actor's gradient as applied (its segment of the bucket) against autograd through each set of critics.
    applied = ordered.learner.bucket.grads[ordered.segments["actor"]].clone()

    def actor_grad(critics: dict[str, torch.Tensor]) -> torch.Tensor:  # the temperature from before the update
        probe = build_algorithm(small("sac"), LocalComm())
        probe.model.load_state_dict({**before, **{k: v for k, v in critics.items() if k.startswith("critics.")}})
        actions, log_prob = probe.model.actor.sample(b.obs, noise[0])
        loss = probe.actor_loss(b.obs, actions, log_prob, probe.model.log_alpha.detach().exp())
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(probe.model.actor.parameters()))])
    after, pre = actor_grad(two), actor_grad(before)
    assert update.terms["loss_actor"] != 0.0
    torch.testing.assert_close(applied, after, rtol=1e-5, atol=1e-7)
    assert (applied - pre).abs().max() > 1e-4, "the actor read the critics before their step"
    assert any(not torch.equal(one[k], two[k]) for k in before if k.startswith("actor."))


def _sb3_sac_train(algo, batches, noises, monkeypatch) -> dict[str, torch.Tensor]:
    """Stable-Baselines3's SAC.train over `batches` (its replay buffer's samples) with its Gaussians drawing
    `noises` (at s, then at s', per update), from `algo`'s parameters; its parameters after, named as ours."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.type_aliases import ReplayBufferSamples
    c = algo.cfg
    assert c.actor_lr == c.critic_lr == c.alpha_lr and c.alpha_init == 1.0 and c.target_entropy is None, "SB3's one lr"
    sb = SAC("MlpPolicy", "Pendulum-v1", learning_rate=c.actor_lr, batch_size=len(batches[0].rewards), tau=c.tau,
             gamma=0.99, policy_kwargs={"net_arch": [16, 16]}, seed=0, device="cpu")
    pol, m = sb.policy, algo.model
    pairs = {"actor.trunk": pol.actor.latent_pi, "actor.mean": pol.actor.mu, "actor.log_std": pol.actor.log_std,
             "critics.q1": pol.critic.qf0, "critics.q2": pol.critic.qf1}

    def linears(module):
        return [x for x in module.modules() if isinstance(x, torch.nn.Linear)]
    with torch.no_grad():
        for name, theirs in pairs.items():
            for a, b in zip(linears(m.get_submodule(name)), linears(theirs), strict=True):
                b.weight.copy_(a.weight), b.bias.copy_(a.bias)
        pol.critic_target.load_state_dict(pol.critic.state_dict())
    samples = [ReplayBufferSamples(b.obs, b.actions, b.next_obs, b.terminated[:, None], b.rewards[:, None], None)
               for b in batches]
    monkeypatch.setattr(sb.replay_buffer, "sample", lambda batch_size, env=None: samples.pop(0))
    draws = [x for pair in noises for x in pair]
    monkeypatch.setattr(torch.distributions.Normal, "rsample",
                        lambda self, shape=torch.Size(): self.loc + self.scale * draws.pop(0))
    from stable_baselines3.common.logger import configure
    sb.set_logger(configure(None, []))
    sb.train(gradient_steps=len(batches), batch_size=len(batches[0].rewards))
    assert not samples and not draws
    out = {}
    for name, theirs in pairs.items():
        for i, (a, b) in enumerate(zip(linears(m.get_submodule(name)), linears(theirs))):
            out[f"{name}.{i}"] = torch.cat([b.weight.detach().reshape(-1), b.bias.detach()])
    out["log_alpha"] = sb.log_ent_coef.detach().reshape(1)
    out["target"] = torch.cat([torch.cat([x.weight.detach().reshape(-1), x.bias.detach()])
                               for q in (pol.critic_target.qf0, pol.critic_target.qf1) for x in linears(q)])
    return out


def _ours(algo) -> dict[str, torch.Tensor]:
    """The same names for p2prl's parameters (the target critics laid out as SB3's: each layer's weight, bias)."""
    m, out = algo.model, {}

    def linears(module):
        return [x for x in module.modules() if isinstance(x, torch.nn.Linear)]
    for name in ("actor.trunk", "actor.mean", "actor.log_std", "critics.q1", "critics.q2"):
        for i, a in enumerate(linears(m.get_submodule(name))):
            out[f"{name}.{i}"] = torch.cat([a.weight.detach().reshape(-1), a.bias.detach()])
    out["log_alpha"] = m.log_alpha.detach().reshape(1)
    out["target"] = torch.cat([torch.cat([x.weight.detach().reshape(-1), x.bias.detach()])
                               for q in (algo.target.q1, algo.target.q2) for x in linears(q)])
    return out


@pytest.mark.parametrize("in_order", [True, False])
def test_thirty_updates_track_sb3s_sac_train_in_its_order_only(small, monkeypatch, in_order):
    """30 updates (steps of Adam, the temperature and the Polyak targets included) from the same parameters,
    minibatches and noise as SB3's SAC.train: in SB3's order (the default) every parameter stays within float
    rounding of SB3's; the one-step order (the actor through the critics before their step) drifts apart."""
    pytest.importorskip("stable_baselines3")
    algo = build_algorithm(small("sac", f"algo.actor_after_critics={str(in_order).lower()}"), LocalComm())
    g = torch.Generator().manual_seed(7)
    n, k = 32, 30
    batches = [ReplayBatch(obs=torch.randn(n, 3, generator=g), actions=torch.rand(n, 1, generator=g) * 2 - 1,
                           rewards=torch.randn(n, generator=g), next_obs=torch.randn(n, 3, generator=g),
                           discounts=torch.full((n,), 0.99), terminated=(torch.rand(n, generator=g) < 0.2).float())
               for _ in range(k)]
    noises = [tuple(torch.randn(2, n, 1, generator=g)) for _ in range(k)]
    theirs = _sb3_sac_train(algo, batches, noises, monkeypatch)
    for b, noise in zip(batches, noises):
        update = algo.update_in_order(b, noise) if in_order else algo.learner.step(*algo.loss(b, noise))
        algo.after_update(update)
    ours = _ours(algo)
    gap = max(float((ours[key] - theirs[key]).abs().max()) for key in theirs)
    moved = max(float((ours[key] - _ours(build_algorithm(small("sac"), LocalComm()))[key]).abs().max()) for key in ours)
    assert moved > 1e-3, "the updates did not move the parameters"
    if in_order:  # 2e-7 measured: float rounding
        assert gap < 1e-6, gap
    else:  # 3e-5 measured, in the actor
        assert gap > 1e-5, gap


def test_local_sgd_counts_an_update_in_two_parts_once(small):
    """comm.average_every counts updates: SAC's two learner steps per update are one."""
    algo = build_algorithm(small("sac", "comm=local_sgd", "comm.average_every=3"), LocalComm())
    for i in range(72):
        algo.sample(i / 72)
        algo.learn(i / 72)
    strategy = algo.learner.strategy
    assert algo.learner.updates == algo.learner.attempts == strategy.calls > 3
    assert algo.learner.optimizer.param_groups[0]["step"] == strategy.calls  # the actor stepped once per update


def test_td3_target_policy_smoothing_hand_computed(small):
    algo = build_algorithm(small("td3", "algo.hidden_sizes=[]"), LocalComm())
    target = algo.target
    # Target actor: tanh(0.8...) = 0.8 everywhere; target critics: q = w * action + c, w on the action input.
    _set(target.actor, **{"net.0": math.atanh(0.8)})
    _set(target.critics, **{"q1.0": 0.5, "q2.0": 1.0})
    with torch.no_grad():
        target.critics.q1[0].weight[0, 3] = 2.0
        target.critics.q2[0].weight[0, 3] = -1.0
    b = _batch()
    _set(algo.model.critics)  # online q1 = q2 = 0
    for noise, action in ((10.0, 1.0), (-10.0, 0.3), (0.5, 0.9)):  # 0.2 x noise clipped to +-0.5, then to [-1, 1]
        _, terms = algo.loss(b, torch.full((4, 1), noise), train_actor=False)
        y = b.rewards + 0.9 * (1 - b.terminated) * min(0.5 + 2.0 * action, 1.0 - action)
        assert terms["loss_critic"].item() == pytest.approx(2 * (y ** 2).mean().item(), rel=1e-5), noise
    assert terms["actor_update"].item() == 0.0 and terms["loss_actor"].item() == 0.0
    _set(algo.model.critics, **{"q1.0": 3.0})
    _, terms = algo.loss(b, torch.zeros(4, 1), train_actor=True)
    assert terms["actor_update"].item() == 1.0 and terms["loss_actor"].item() == pytest.approx(-3.0)


@pytest.mark.parametrize("in_order", ["false", "true"])
def test_td3_moves_the_actor_and_targets_only_on_delayed_updates(small, in_order):
    algo = build_algorithm(small("td3", "algo.gradient_steps=1", "algo.policy_delay=2",
                                 f"algo.actor_after_critics={in_order}"), LocalComm())
    opt, actor = algo.learner.optimizer, algo.segments["actor"]
    while not algo.ready():
        algo.sample(0.0)
    seen = []
    for i in range(4):
        before, target = algo.flat.clone(), algo.target_flat.clone()
        moments = opt.exp_avg[actor].clone(), opt.exp_avg_sq[actor].clone()
        algo.sample(0.1)
        algo.learn(0.1)
        trains_actor = algo.updates_started % 2 == 0
        moved = not torch.equal(algo.flat[actor], before[actor])
        seen.append(trains_actor)
        assert moved == trains_actor and (not torch.equal(algo.target_flat, target)) == trains_actor, i
        if not trains_actor:  # Adam leaves the actor's moments alone too, as an optimizer not stepped would
            assert torch.equal(opt.exp_avg[actor], moments[0]) and torch.equal(opt.exp_avg_sq[actor], moments[1])
        assert not torch.equal(algo.flat[algo.segments["critics"]], before[algo.segments["critics"]])
    steps = {g["name"]: g["step"] for g in opt.param_groups}
    assert seen == [False, True, False, True] and steps == {"actor": 2, "critics": 4}


# -- 2 peers -------------------------------------------------------------------------------------
def _one_update(cfg, comm, batch: ReplayBatch, noise: torch.Tensor, rows: slice) -> torch.Tensor:
    algo = build_algorithm(cfg, comm)
    part = ReplayBatch(*(t[rows] for t in batch))
    sac, in_order = cfg.algo.name == "sac", cfg.algo.actor_after_critics
    args = (part, (noise[0, rows], noise[1, rows])) if sac else (part, noise[0, rows], True)
    update = algo.update_in_order(*args) if in_order else algo.learner.step(*algo.loss(*args))
    assert update.applied
    algo.after_update(update)
    return torch.cat([algo.flat.clone(), algo.target_flat])


def _half_update(rank: int, cfg, batch, noise):
    return _one_update(cfg, open_comm(cfg.comm, "gloo"), batch, noise, slice(8 * rank, 8 * rank + 8))


ORDERS = [("sac", "true"), ("sac", "false"), ("td3", "true"), ("td3", "false")]


@pytest.mark.parametrize("name,in_order", ORDERS)
def test_two_peers_with_half_the_batch_equal_one_peer_with_all(name, in_order, small, peers):
    cfg = small(name, f"algo.actor_after_critics={in_order}")
    batch, noise = _batch(16), torch.randn(2, 16, 1, generator=torch.Generator().manual_seed(1))
    before = torch.cat([build_algorithm(cfg, LocalComm()).flat.clone(), build_algorithm(cfg, LocalComm()).target_flat])
    whole = _one_update(cfg, LocalComm(), batch, noise, slice(0, 16))
    a, b = peers(_half_update, 2, cfg, batch, noise, timeout=150)
    assert torch.equal(a, b)
    assert (whole - before).abs().max() > 1e-4, "the update did not move the parameters"
    assert torch.allclose(a, whole, atol=1e-6), (a - whole).abs().max()


def _short_run(rank: int, cfg):
    algo = build_algorithm(cfg, open_comm(cfg.comm, "gloo"))
    for i in range(40):
        algo.sample(i / 40)
        algo.learn(i / 40)
    b = algo.buffer
    return (algo.learner.updates, parameter_digest(algo.shared_tensors()),
            torch.from_numpy(b.actions[:b.size].copy()))


@pytest.mark.parametrize("name,in_order", ORDERS)
def test_two_peers_stay_bit_identical_with_their_own_replay(name, in_order, small, peers):
    cfg = small(name, "algo.learning_starts=32", f"algo.actor_after_critics={in_order}")
    (ua, da, acts_a), (ub, db, acts_b) = peers(_short_run, 2, cfg, timeout=150)
    assert ua == ub > 0 and da == db, "parameters, temperature or targets differ between peers"
    assert acts_a.shape == acts_b.shape and not torch.equal(acts_a, acts_b), "peers explore alike"


# -- resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sac", "td3"])
def test_a_pendulum_run_resumes_exactly(name, tmp_path, small):
    """The newest checkpoint set lost: the run resumes from the one before (replay, temperature,
    targets, optimizer, RNG) and ends with the same parameters, targets and optimizer state bit for bit."""
    cfg = small(name, "train.total_steps=384", "train.target_return=null", "train.log_every_steps=64",
                "checkpoint.every_steps=128", "checkpoint.replay=true")
    run_dir = tmp_path / "run"
    first = run(cfg, run_dir)
    folder = run_dir / "checkpoints"
    ended = checkpoint.load(checkpoint.shared_path(folder, first["final_step"]))
    checkpoint.shared_path(folder, first["final_step"]).unlink()
    again = run(cfg, run_dir)
    assert again["resumed_at_step"] == 256 and again["final_step"] == first["final_step"]
    redone = checkpoint.load(checkpoint.shared_path(folder, again["final_step"]))
    for key in ("model", "target", "learner"):
        want, got = _tensors(ended[key]), _tensors(redone[key])
        assert want and len(want) == len(got) and all(torch.equal(a, b) for a, b in zip(want, got)), key
    assert redone["learner"]["updates"] == ended["learner"]["updates"] > 0


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    return []


def test_policy_and_export_act_in_the_bounds(small):
    from p2prl import algos
    cfg = small("sac")
    algo = build_algorithm(cfg, LocalComm())
    state = algo.state_dict()
    space = algo.collector.action_space
    obs = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    act = algos.spec("sac").policy(cfg.algo, state, algo.collector.observation_space, space, torch.device("cpu"))
    greedy = act(obs, True, np.random.default_rng(0))
    module = algos.spec("sac").greedy_module(cfg.algo, state, algo.collector.observation_space, space)
    want = 2.0 * algo.model.actor(torch.from_numpy(obs)).detach().numpy()  # Pendulum's torque in [-2, 2]
    assert greedy.shape == (5, 1) and np.allclose(greedy, want, atol=1e-6)
    assert np.allclose(module(torch.from_numpy(obs)).numpy(), greedy, atol=1e-6)
    sampled = act(obs, False, np.random.default_rng(0))
    assert not np.allclose(sampled, greedy) and (np.abs(sampled) <= 2.0).all()
