"""Turning results into the claims table, the final JSON line, plots and docs/fidelity.md.

The claim rules are fixed here, before any result is seen, and are applied mechanically:

* ``small_k_beats_full``: at the last update, mean held-out reward of DRaFT-1 minus that of full
  DRaFT; held if the difference exceeds the larger of the two seed spreads (std), "not" if it is
  below minus that spread, unclear otherwise.
* ``lv_lower_variance``: DRaFT-LV n=2 vs DRaFT-1 at fixed parameters; held if both the trace of
  the gradient covariance and the relative variance (trace / |mean|^2) are lower, "not" if both
  are higher, unclear if they disagree.
* ``lv_fewer_updates``: updates until the mean held-out reward first reaches the halfway point
  between the base reward and DRaFT-1's final reward (linear interpolation between evaluations);
  held if DRaFT-LV n=2 gets there at least one evaluation interval earlier than DRaFT-1, "not" if
  at least one interval later (or never), unclear otherwise.
* ``strength_interpolates``: reward at strengths 0, 0.25, 0.5, 1 strictly increasing and the
  judge's log-probability likewise: held; neither monotone: "not"; otherwise unclear.
* ``long_runs_exploit``: in the long run without KL, the training reward (held-out seeds) at the
  end is above its value at the first evaluation after a quarter of the run, while the judge's
  log-probability ends at least 0.5 nats below its best or the realism guard ends at least 25 %
  above the base model's: held; reward still rising and neither guard degraded: "not"; else unclear.
* ``kl_reduces_exploitation`` (DRaFT+): for the largest KL coefficient vs none, held if the final
  realism guard is lower (closer to real digits) and the final judge log-prob is not lower by more
  than 0.1 nats; "not" if the guard is not lower; else unclear.
* ``heldout_keeps_best`` (the held-out check, ``training/heldout.py``, stop off, keep best, ranked
  by the judge's mean p(target) on the check's own held-out noises): judged **per method, on the
  means over seeds** of the judged-target fraction measured by ``Lab.evaluate`` (its 32 held-out
  noises, apart from the check's) at the kept update, at the run's best evaluation (per run, the
  highest fraction of any evaluation, update 0 included) and at the last. The methods "where the
  last is worse than the best" are those whose mean last fraction is below their mean best one.
  Held if for every such method the mean kept fraction is within 0.05 of the mean best; "not" if
  it is more than 0.05 below for any of them; unclear if no method ended below its best. What
  ``stop = "on"`` (patience and tolerance of the budget) would have saved: the real
  ``HeldoutCheck.observe`` replayed over each run's recorded evaluations; reported, no verdict.
* ``kl_curbs_at_equal_reward`` (DRaFT+'s KL sweep, the long runs): a coefficient is *compared* if
  its run's best held-out reward rose by at least half of the no-KL run's rise over the base
  model; the common level ``L`` is the lowest of the compared runs' best rewards (a level every
  compared run reached). For each compared run, judge log-p, judged fraction and realism guard are
  interpolated linearly at the first crossing of ``L``. With ``c*`` the largest compared
  coefficient above 0, against no KL at ``L``: the guard better by at least 0.005 or the judge
  log-p better by at least 0.1 nats, and neither worse by as much: held; neither better by as
  much: "not"; otherwise (one better, the other worse) or no coefficient above 0 compared:
  unclear.
* ``lv_conditional_variance`` (DRaFT-LV's variance given the chain): with the chain (initial
  noise, DDIM chain, ``x_0``) fixed and only the re-noising varied, the trace of the covariance
  averaged over chains; for every n > 1, ``ratio_n`` = LV-n's over LV-1's. Held if every
  ``n * ratio_n`` lies in [1/1.5, 1.5] (the variance falls as 1/n, within a factor 1.5); "not" if
  any ``ratio_n`` is at least 0.9 (no fall); unclear otherwise.
"""
from __future__ import annotations

import json
import os

import numpy as np


def _curve(runs: list, key: str = "reward"):
    """(updates (E,), mean (E,), std (E,), seconds mean (E,)) across seed runs."""
    ups = np.array(runs[0]["updates"])
    vals = np.array([[e[key] for e in r["eval"]] for r in runs])
    secs = np.array([r["seconds"] for r in runs])
    return ups, vals.mean(0), vals.std(0), secs.mean(0)


def _crossing(ups, vals, level):
    for i in range(len(vals)):
        if vals[i] >= level:
            if i == 0:
                return float(ups[0])
            f = (level - vals[i - 1]) / (vals[i] - vals[i - 1])
            return float(ups[i - 1] + f * (ups[i] - ups[i - 1]))
    return float("inf")


def decide_claims(results: dict) -> dict:
    """``claim -> {"verdict": "held" | "not" | "unclear", "numbers": str}`` (rules: module doc)."""
    claims = {}
    runs = results["runs"]
    base = results["reward_before"]

    _, k1, k1s, _ = _curve(runs["draft_k1"])
    _, full, fulls, _ = _curve(runs["draft_full"])
    diff, spread = k1[-1] - full[-1], max(k1s[-1], fulls[-1])
    v = "held" if diff > spread else "not" if diff < -spread else "unclear"
    others = ", ".join(f"{m} {_curve(runs[m])[1][-1]:.3f}" for m in ("draft_k5", "draft_k10"))
    claims["small_k_beats_full"] = {"verdict": v, "numbers": (
        f"final reward DRaFT-1 {k1[-1]:.3f} +- {k1s[-1]:.3f} vs full {full[-1]:.3f} +- "
        f"{fulls[-1]:.3f} (diff {diff:+.3f}, spread {spread:.3f}); {others}")}

    gv = results["grad_variance"]
    a, b = gv["draft_lv2"], gv["draft_k1"]
    lower = [a["trace_var"] < b["trace_var"], a["rel_var"] < b["rel_var"]]
    v = "held" if all(lower) else "not" if not any(lower) else "unclear"
    claims["lv_lower_variance"] = {"verdict": v, "numbers": (
        f"trace var LV2 {a['trace_var']:.3g} / LV4 {gv['draft_lv4']['trace_var']:.3g} vs "
        f"DRaFT-1 {b['trace_var']:.3g}; relative var LV2 {a['rel_var']:.3g} / LV4 "
        f"{gv['draft_lv4']['rel_var']:.3g} vs DRaFT-1 {b['rel_var']:.3g}")}

    ups, lv, _, _ = _curve(runs["draft_lv2"])
    level = base + 0.5 * (k1[-1] - base)
    c_lv, c_k1 = _crossing(ups, lv, level), _crossing(ups, k1, level)
    step = float(ups[1] - ups[0]) if len(ups) > 1 else 1.0
    v = ("held" if c_lv <= c_k1 - step else "not" if c_lv >= c_k1 + step else "unclear")
    if not np.isfinite(c_k1) and not np.isfinite(c_lv):
        v = "unclear"
    claims["lv_fewer_updates"] = {"verdict": v, "numbers": (
        f"updates to reach reward {level:.3f} (halfway base -> DRaFT-1 final): LV2 {c_lv:.1f}, "
        f"DRaFT-1 {c_k1:.1f} (evaluation every {step:.0f}); final LV2 {lv[-1]:.3f}")}

    sw = results["strength_sweep"]
    keys = [k for k in ("0", "0.25", "0.5", "1") if k in sw]
    r = [sw[k]["reward"] for k in keys]
    j = [sw[k]["judge_logp"] for k in keys]
    mono = [all(np.diff(r) > 0), all(np.diff(j) > 0)]
    v = "held" if all(mono) else "not" if not any(mono) else "unclear"
    ext = sw.get("1.5")
    claims["strength_interpolates"] = {"verdict": v, "numbers": (
        "reward at strength " + ", ".join(f"{k}: {x:.3f}" for k, x in zip(keys, r))
        + (f", 1.5: {ext['reward']:.3f}" if ext else "") + "; judge log-p "
        + ", ".join(f"{x:.3f}" for x in j) + (f", {ext['judge_logp']:.3f}" if ext else ""))}

    hack = results["hacking"]
    none = hack["0"]
    ev = none["eval"]
    q = next(i for i, u in enumerate(none["updates"]) if u >= none["updates"][-1] / 4)
    rising = ev[-1]["reward"] > ev[q]["reward"]
    best_j = max(e["judge_logp"] for e in ev)
    judge_drop = best_j - ev[-1]["judge_logp"]
    guard_rise = ev[-1]["nn_dist"] / ev[0]["nn_dist"] - 1
    degraded = judge_drop >= 0.5 or guard_rise >= 0.25
    v = "held" if rising and degraded else "not" if rising and not degraded else "unclear"
    claims["long_runs_exploit"] = {"verdict": v, "numbers": (
        f"{none['updates'][-1]} updates, no KL: reward {ev[q]['reward']:.3f} (update "
        f"{none['updates'][q]}) -> {ev[-1]['reward']:.3f}; judge log-p best {best_j:.3f}, end "
        f"{ev[-1]['judge_logp']:.3f}; realism guard {ev[0]['nn_dist']:.3f} -> "
        f"{ev[-1]['nn_dist']:.3f} ({100 * guard_rise:+.0f} %)")}

    kmax = max(hack, key=float)
    kl_end = hack[kmax]["eval"][-1]
    guard_lower = kl_end["nn_dist"] < ev[-1]["nn_dist"]
    judge_ok = kl_end["judge_logp"] >= ev[-1]["judge_logp"] - 0.1
    v = "held" if guard_lower and judge_ok else "not" if not guard_lower else "unclear"
    claims["kl_reduces_exploitation"] = {"verdict": v, "numbers": (
        f"end of long run, KL {kmax} vs none: reward {kl_end['reward']:.3f} vs "
        f"{ev[-1]['reward']:.3f}; judge log-p {kl_end['judge_logp']:.3f} vs "
        f"{ev[-1]['judge_logp']:.3f}; realism guard {kl_end['nn_dist']:.3f} vs "
        f"{ev[-1]['nn_dist']:.3f}")}
    ha = heldout_analysis(results)
    worse = {m: d for m, d in ha["methods"].items() if d["last_frac"] < d["best_frac"]}
    gaps = {m: d["best_frac"] - d["kept_frac"] for m, d in worse.items()}
    v = ("unclear" if not worse else "held" if all(g <= 0.05 for g in gaps.values()) else "not")
    claims["heldout_keeps_best"] = {"verdict": v, "numbers": (
        "judged fraction kept / best / last (mean over seeds): " + "; ".join(
            f"{LABELS.get(m, m)} {d['kept_frac']:.2f} / {d['best_frac']:.2f} / "
            f"{d['last_frac']:.2f}" for m, d in ha["methods"].items())
        + "; stop would have saved " + ", ".join(
            f"{LABELS.get(m, m)} {d['saved_updates_mean']:.0f}"
            for m, d in ha["methods"].items()) + f" of {ha['updates']} updates")}

    ks = kl_sweep(results)
    star = ks["compared_star"]
    if star is None:
        v = "unclear"
    else:
        a, z = ks["coeffs"][star]["at_level"], ks["coeffs"]["0"]["at_level"]
        g_better = z["nn_dist"] - a["nn_dist"] >= 0.005
        j_better = a["judge_logp"] - z["judge_logp"] >= 0.1
        g_worse = a["nn_dist"] - z["nn_dist"] >= 0.005
        j_worse = z["judge_logp"] - a["judge_logp"] >= 0.1
        v = ("held" if (g_better or j_better) and not (g_worse or j_worse)
             else "not" if not (g_better or j_better) else "unclear")
    cmp = [k for k, d in ks["coeffs"].items() if d["compared"]]
    claims["kl_curbs_at_equal_reward"] = {"verdict": v, "numbers": (
        f"at held-out reward {ks['level']:.3f}: " + "; ".join(
            f"KL {k}: update {ks['coeffs'][k]['at_level']['update']:.0f}, judge log-p "
            f"{ks['coeffs'][k]['at_level']['judge_logp']:.3f}, judged "
            f"{ks['coeffs'][k]['at_level']['judge_frac']:.2f}, guard "
            f"{ks['coeffs'][k]['at_level']['nn_dist']:.3f}" for k in cmp)
        + (("; not reaching half the no-KL rise: KL " + ", ".join(
            f"{k} (best {d['best_reward']:.3f})" for k, d in ks["coeffs"].items()
            if not d["compared"])) if len(cmp) < len(ks["coeffs"]) else ""))}

    cv = results["lv_conditional_variance"]
    ns = [int(k[len("draft_lv"):]) for k in cv if k.startswith("draft_lv")]
    one = cv.get("draft_lv1", {}).get("cond_var", float("nan"))
    ratios = {n: cv[f"draft_lv{n}"]["cond_var"] / one for n in ns if n > 1}
    if not ratios or not np.isfinite(one) or one <= 0:
        v = "unclear"
    elif all(1 / 1.5 <= n * r <= 1.5 for n, r in ratios.items()):
        v = "held"
    elif any(r >= 0.9 for r in ratios.values()):
        v = "not"
    else:
        v = "unclear"
    claims["lv_conditional_variance"] = {"verdict": v, "numbers": (
        "trace var given the chain: " + ", ".join(
            f"{k} {d['cond_var']:.3g}" for k, d in cv.items()) + "; LV-n / LV-1: "
        + ", ".join(f"n={n} {r:.3f} (1/n = {1 / n:.3f})" for n, r in ratios.items())
        + f"; share of LV-1's total variance that is re-noising "
          f"{cv.get('draft_lv1', {}).get('cond_share', float('nan')):.2f}")}
    return claims


def _frac_at(rec: dict, update) -> float:
    return rec["eval"][rec["updates"].index(update)]["judge_frac"]


def heldout_of_run(rec: dict) -> dict:
    """One run's held-out check against ``Lab.evaluate``'s judged-target fraction: the kept update
    (the check's best by its ranking judge), the best and last evaluations, the stop replay."""
    fr = [e["judge_frac"] for e in rec["eval"]]
    held = rec["heldout"]
    kept = held["best_iteration"]
    best_i = int(np.argmax(fr))
    stop = held["stop_replay"]
    figs = {r["iteration"]: r["figures"] for r in held["evaluations"]}
    last = rec["updates"][-1]
    return {"kept_update": kept, "kept_frac": _frac_at(rec, kept),
            "best_update": rec["updates"][best_i], "best_frac": fr[best_i],
            "last_update": last, "last_frac": fr[-1],
            "kept_judge_p": figs[kept]["judge1"], "last_judge_p": figs[last]["judge1"],
            "kept_guard": -figs[kept]["judge2"], "last_guard": -figs[last]["judge2"],
            "stop_update": stop["stop_update"], "saved_updates": stop["saved_updates"],
            "stop_kept_update": stop["kept_update"],
            "stop_kept_frac": _frac_at(rec, stop["kept_update"])}


def heldout_analysis(results: dict) -> dict:
    """``{"methods": {method: means over seeds and per-seed lists}, "long_runs": {kl: one run},
    "updates": updates per method run}`` (rule: module doc, ``heldout_keeps_best``)."""
    methods = {}
    for m, rs in results["runs"].items():
        per = [heldout_of_run(r) for r in rs]
        d = {k: float(np.mean([p[k] for p in per]))
             for k in ("kept_frac", "best_frac", "last_frac", "stop_kept_frac", "kept_judge_p",
                       "last_judge_p", "kept_guard", "last_guard")}
        d["saved_updates_mean"] = float(np.mean([p["saved_updates"] for p in per]))
        for k in ("kept_update", "best_update", "stop_update", "saved_updates"):
            d[k] = [p[k] for p in per]
        methods[m] = d
    long_runs = {kl: heldout_of_run(rec) for kl, rec in results["hacking"].items()}
    return {"methods": methods, "long_runs": long_runs,
            "updates": results["budget"]["updates"]}


FIGURES = ("reward", "judge_logp", "judge_frac", "nn_dist")  # what Lab.evaluate measures


def _at_level(rec: dict, level: float) -> dict:
    """Figures of ``Lab.evaluate`` interpolated at the first crossing of held-out reward
    ``level`` (linear between the evaluations around it)."""
    ev, ups = rec["eval"], rec["updates"]
    for i, e in enumerate(ev):
        if e["reward"] >= level:
            if i == 0:
                return {"update": float(ups[0]), **{k: ev[0][k] for k in FIGURES}}
            a, b = ev[i - 1], e
            f = (level - a["reward"]) / (b["reward"] - a["reward"])
            out = {"update": float(ups[i - 1] + f * (ups[i] - ups[i - 1]))}
            for k in FIGURES:
                out[k] = float(a[k] + f * (b[k] - a[k]))
            return out
    return None


def kl_sweep(results: dict) -> dict:
    """DRaFT+'s KL coefficients compared at equal held-out training reward (rule: module doc,
    ``kl_curbs_at_equal_reward``)."""
    hack = results["hacking"]
    base = results["reward_before"]
    best = {k: max(e["reward"] for e in rec["eval"]) for k, rec in hack.items()}
    rise0 = best["0"] - base
    compared = [k for k in hack if best[k] - base >= 0.5 * rise0]
    level = min(best[k] for k in compared)
    coeffs = {}
    for k in sorted(hack, key=float):
        rec = hack[k]
        end = rec["eval"][-1]
        coeffs[k] = {"compared": k in compared, "best_reward": best[k],
                     "at_level": _at_level(rec, level) if k in compared else None,
                     "final": {x: end[x] for x in FIGURES}}
    above = [k for k in compared if float(k) > 0]
    return {"level": level, "coeffs": coeffs,
            "compared_star": max(above, key=float) if above else None}


def summary(results: dict, claims: dict) -> dict:
    """The one-line JSON object ``make fidelity`` ends with."""
    runs = results["runs"]
    after = {}
    for m, rs in runs.items():
        finals = [r["eval"][-1]["reward"] for r in rs]
        after[m] = {"mean": round(float(np.mean(finals)), 4),
                    "std": round(float(np.std(finals)), 4)}
    gv = {m: {k: float(f"{v:.4g}") for k, v in d.items()}
          for m, d in results["grad_variance"].items()}
    gn = {k: {"mean": float(f"{d['mean']:.4g}"), "std": float(f"{d['std']:.4g}")}
          for k, d in results["grad_norm_by_k"].items()}
    sw = {s: {k: round(v, 4) for k, v in d.items()}
          for s, d in results["strength_sweep"].items() if not s.startswith("_")}
    ha = heldout_analysis(results)
    held = {m: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}
            for m, d in ha["methods"].items()}
    held["long_runs"] = {kl: {k: d[k] for k in ("kept_update", "kept_frac", "best_frac",
                                                 "last_frac", "stop_update", "saved_updates")}
                         for kl, d in ha["long_runs"].items()}
    ks = kl_sweep(results)
    kl = {"level": round(ks["level"], 4), "coeffs": {
        k: {"compared": d["compared"], "best_reward": round(d["best_reward"], 4),
            "at_level": None if d["at_level"] is None else {
                x: round(y, 4) for x, y in d["at_level"].items()},
            "final": {x: round(y, 4) for x, y in d["final"].items()}}
        for k, d in ks["coeffs"].items()}}
    cv = {m: {k: float(f"{v:.4g}") for k, v in d.items()}
          for m, d in results["lv_conditional_variance"].items()}
    return {"reward_before": round(results["reward_before"], 4), "reward_after": after,
            "grad_variance": gv, "grad_norm_by_k": gn, "strength_sweep": sw,
            "heldout": held, "kl_sweep": kl, "lv_conditional_variance": cv,
            "claims": {c: d["verdict"] for c, d in claims.items()}}


LABELS = {"draft_full": "full DRaFT (K=T)", "draft_k1": "DRaFT-1", "draft_k5": "DRaFT-5",
          "draft_k10": "DRaFT-10", "draft_lv2": "DRaFT-LV n=2", "random_k": "random K (1-10)"}


def plots(results: dict, out_dir: str) -> list:
    """Write the PNG plots into ``out_dir``; returns their file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    names = []
    runs = results["runs"]

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=90)
        plt.close(fig)
        names.append(name)

    for xkey, name, xlabel in (("updates", "reward_vs_updates.png", "optimizer updates"),
                               ("seconds", "reward_vs_time.png", "training wall time (s)")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for m, rs in runs.items():
            ups, mean, std, secs = _curve(rs)
            x = ups if xkey == "updates" else secs
            ax.plot(x, mean, label=LABELS.get(m, m))
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reward: log p(target) on held-out seeds")
        ax.set_title(f"mean and std over {len(next(iter(runs.values())))} seeds")
        ax.legend(fontsize=8)
        save(fig, name)

    gv = results["grad_variance"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    ms = list(gv)
    for ax, key, title in ((axes[0], "trace_var", "trace of gradient covariance"),
                           (axes[1], "rel_var", "relative variance (trace / |mean|^2)")):
        ax.bar(ms, [gv[m][key] for m in ms], color=["C1", "C4", "C5"][:len(ms)])
        ax.set_title(title, fontsize=9)
        ax.set_yscale("log")
    save(fig, "grad_variance.png")

    gn = results["grad_norm_by_k"]
    ks = [int(k) for k in gn]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.errorbar(ks, [gn[str(k)]["mean"] for k in ks], yerr=[gn[str(k)]["std"] for k in ks],
                marker="o", capsize=3)
    ax.set_xlabel("K (differentiated steps)")
    ax.set_ylabel("gradient norm")
    ax.set_yscale("log")
    save(fig, "grad_norm_by_k.png")

    sw = {float(k): v for k, v in results["strength_sweep"].items() if not k.startswith("_")}
    xs = sorted(sw)
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, key, title in ((axes[0], "reward", "training reward"),
                           (axes[1], "judge_logp", "judge log p(target)"),
                           (axes[2], "nn_dist", "realism guard (NN distance)")):
        ax.plot(xs, [sw[x][key] for x in xs], marker="o")
        ax.set_xlabel("LoRA strength")
        ax.set_title(title, fontsize=9)
    save(fig, "strength_sweep.png")

    hack = results["hacking"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for kl, rec in sorted(hack.items(), key=lambda kv: float(kv[0])):
        ups = rec["updates"]
        for ax, key in zip(axes, ("reward", "judge_logp", "nn_dist")):
            ax.plot(ups, [e[key] for e in rec["eval"]], marker=".", label=f"KL coeff {kl}")
    for ax, title in zip(axes, ("training reward (held-out seeds)", "judge log p(target)",
                                "realism guard (NN distance)")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("updates")
    axes[0].legend(fontsize=8)
    save(fig, "hacking.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = ((axes[0], [(LABELS.get(m, m), rs[0]) for m, rs in runs.items()],
               "methods, seed 0"),
              (axes[1], [(f"KL {k}", rec) for k, rec in sorted(hack.items(),
                                                                key=lambda kv: float(kv[0]))],
               "long runs (DRaFT-LV n=2, seed 0)"))
    for ax, recs, title in panels:
        for i, (label, rec) in enumerate(recs):
            held = rec["heldout"]
            ups = [r["iteration"] for r in held["evaluations"]]
            ys = [r["figures"]["judge1"] for r in held["evaluations"]]
            (line,) = ax.plot(ups, ys, marker=".", label=label, color=f"C{i}")
            kept = held["best_iteration"]
            ax.plot([kept], [ys[ups.index(kept)]], marker="*", markersize=13,
                    color=line.get_color(), markeredgecolor="k")
            stop = held["stop_replay"]["stop_update"]
            if stop is not None:
                ax.plot([stop], [ys[ups.index(stop)]], marker="x", markersize=9, color="k")
        ax.set_title(f"{title}; star: kept update, x: where stop = on would end", fontsize=9)
        ax.set_xlabel("updates")
        ax.set_ylabel("held-out check: judge mean p(target)", fontsize=8)
        ax.legend(fontsize=7)
    save(fig, "heldout.png")
    return names


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
