//! The statistics the report judges targets with: the median and range of per-round values,
//! the median's distribution-free confidence interval, and a verdict that says whether the run
//! can tell. Pure functions, unit-tested.

/// Per-round values summarized: median, range, and the median's confidence interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The median's confidence interval ([`median_ci`]) and its coverage.
    pub ci_lo: f64,
    pub ci_hi: f64,
    pub ci_level: f64,
    pub n: usize,
}

/// The spread of the finite values of `v`; `None` if there are none.
pub fn spread(v: &[f64]) -> Option<Spread> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    let (ci_lo, ci_hi, ci_level) = median_ci(&v);
    Some(Spread {
        median,
        min: v[0],
        max: v[n - 1],
        ci_lo,
        ci_hi,
        ci_level,
        n,
    })
}

/// The distribution-free confidence interval of the median of `sorted` (ascending, not
/// empty): the order statistics `x(k)..x(n+1-k)` (1-based) for the largest `k` whose coverage,
/// `1 - 2 P(B < k)` with `B ~ Binomial(n, 1/2)`, is at least 95 %. It assumes only that the
/// rounds are independent draws. Below six rounds no `k` reaches 95 %: the interval is then
/// the whole range, at its own coverage (93.75 % for five rounds, 0 for one). Returns
/// `(low, high, coverage)`.
pub fn median_ci(sorted: &[f64]) -> (f64, f64, f64) {
    let n = sorted.len();
    let p = 0.5f64.powi(n as i32);
    // k = 1: P(B < 1) = P(B = 0) = p.
    let (mut k, mut coverage) = (1, 1.0 - 2.0 * p);
    let (mut choose, mut below) = (1.0, p);
    for i in 1..n / 2 {
        // k = i + 1: P(B < k) = P(B <= i).
        choose = choose * (n - i + 1) as f64 / i as f64;
        below += choose * p;
        let c = 1.0 - 2.0 * below;
        if c < 0.95 {
            break;
        }
        (k, coverage) = (i + 1, c);
    }
    (sorted[k - 1], sorted[n - k], coverage)
}

/// A confidence level as the report says it: `95 %`, `93.8 %`.
pub fn level(c: f64) -> String {
    let pct = c * 100.0;
    if (pct - pct.round()).abs() < 0.05 {
        format!("{pct:.0} %")
    } else {
        format!("{pct:.1} %")
    }
}

/// Which side of its target a figure must be on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// At least the target (throughput ratios).
    AtLeast,
    /// At most the target (costs).
    AtMost,
}

/// How a target fared in a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The median's whole confidence interval is on the target's side.
    Met,
    /// The median is on the target's side; the interval reaches across.
    MetOnMedian,
    /// The median is on the wrong side; the interval reaches the target.
    MissedOnMedian,
    /// The whole interval is on the wrong side.
    Missed,
}

/// Judge `s` against `target`: on the median, established only when the median's confidence
/// interval is on the same side (with a few noisy rounds a miss or a pass can be the machine's
/// luck, and the verdict says so rather than counting it either way).
pub fn judge(s: &Spread, target: f64, goal: Goal) -> Verdict {
    let ok = |x: f64| match goal {
        Goal::AtLeast => x >= target,
        Goal::AtMost => x <= target,
    };
    match (ok(s.median), ok(s.ci_lo), ok(s.ci_hi)) {
        (true, true, true) => Verdict::Met,
        (true, _, _) => Verdict::MetOnMedian,
        (false, false, false) => Verdict::Missed,
        (false, _, _) => Verdict::MissedOnMedian,
    }
}

impl Verdict {
    pub fn met(self) -> bool {
        matches!(self, Verdict::Met | Verdict::MetOnMedian)
    }

    /// The verdict as the report's table says it.
    pub fn words(self) -> &'static str {
        match self {
            Verdict::Met => "**met**",
            Verdict::MetOnMedian => "**met** on the median, not established",
            Verdict::MissedOnMedian => "**missed** on the median, not established",
            Verdict::Missed => "**missed**",
        }
    }
}

/// The `q` quantile (0..=1) of `v` by the nearest lower rank; `NaN` when `v` is empty.
pub fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q.clamp(0.0, 1.0)) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_gives_median_and_range() {
        let s = spread(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 3.0, 5.0));
        let s = spread(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.median, 2.5);
        let s = spread(&[7.0, f64::NAN]).unwrap();
        assert_eq!((s.n, s.min, s.median, s.max), (1, 7.0, 7.0, 7.0));
        assert_eq!((s.ci_lo, s.ci_hi, s.ci_level), (7.0, 7.0, 0.0));
        assert!(spread(&[]).is_none());
        assert!(spread(&[f64::INFINITY]).is_none());
    }

    #[test]
    fn the_median_interval_is_the_order_statistics_of_the_binomial_table() {
        let ci = |n: usize| {
            let v: Vec<f64> = (1..=n).map(|i| i as f64).collect();
            median_ci(&v)
        };
        // Five rounds: no interval reaches 95 %; the whole range covers 1 - 2/32.
        assert_eq!(ci(5), (1.0, 5.0, 0.9375));
        // Published tables: n = 10 -> x(2)..x(9) (97.9 %), 15 -> x(4)..x(12) (96.5 %),
        // 30 -> x(10)..x(21) (95.7 %).
        let (lo, hi, c) = ci(10);
        assert_eq!((lo, hi), (2.0, 9.0));
        assert!((c - 0.9785).abs() < 1e-3, "{c}");
        let (lo, hi, c) = ci(15);
        assert_eq!((lo, hi), (4.0, 12.0));
        assert!((c - 0.9648).abs() < 1e-3, "{c}");
        let (lo, hi, c) = ci(30);
        assert_eq!((lo, hi), (10.0, 21.0));
        assert!((c - 0.9572).abs() < 1e-3, "{c}");
        assert_eq!(level(0.9375), "93.8 %");
        assert_eq!(level(0.95), "95 %");
    }

    #[test]
    fn a_verdict_is_established_only_when_the_interval_is_on_its_side() {
        let s = |v: &[f64]| spread(v).unwrap();
        // 30 rounds, one of them lucky: a miss all the same.
        let mut v = vec![0.9; 29];
        v.push(1.2);
        assert_eq!(judge(&s(&v), 0.98, Goal::AtLeast), Verdict::Missed);
        // Five rounds whose best reaches the target: the median misses, not established.
        let v = [0.9, 0.9, 0.95, 0.96, 1.0];
        assert_eq!(judge(&s(&v), 0.98, Goal::AtLeast), Verdict::MissedOnMedian);
        // Met on every round of fifteen: established.
        assert_eq!(judge(&s(&[1.0; 15]), 0.98, Goal::AtLeast), Verdict::Met);
        // Met on the median of two, one of them below.
        assert_eq!(
            judge(&s(&[0.97, 0.99]), 0.98, Goal::AtLeast),
            Verdict::MetOnMedian
        );
        // Costs: at most the target.
        assert_eq!(
            judge(&s(&[600.0, 640.0, 700.0]), 650.0, Goal::AtMost),
            Verdict::MetOnMedian
        );
        assert_eq!(
            judge(&s(&[900.0, 950.0, 990.0]), 650.0, Goal::AtMost),
            Verdict::Missed
        );
        assert!(Verdict::MetOnMedian.met() && !Verdict::MissedOnMedian.met());
    }

    #[test]
    fn quantiles_take_the_lower_rank() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&mut v, 0.5), 2.0);
        assert_eq!(quantile(&mut v, 0.0), 1.0);
        assert_eq!(quantile(&mut v, 1.0), 4.0);
        assert!(quantile(&mut [], 0.5).is_nan());
    }
}
