//! Small statistics used by the regression verdicts: Welch's t-test and Holm's correction.

/// Mean and sample variance.
pub fn mean_var(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var)
}

/// One-sided Welch's t-test p-value for "mean of `b` is greater than mean of `a`".
/// `None` when either side has fewer than two values.
pub fn welch_greater(a: &[f64], b: &[f64]) -> Option<f64> {
    let (ma, va) = mean_var(a);
    let (mb, vb) = mean_var(b);
    welch_greater_summary((ma, va, a.len() as f64), (mb, vb, b.len() as f64))
}

/// `welch_greater` from summary statistics: (mean, sample variance, count) of each side.
pub fn welch_greater_summary(a: (f64, f64, f64), b: (f64, f64, f64)) -> Option<f64> {
    let ((ma, va, na), (mb, vb, nb)) = (a, b);
    if na < 2.0 || nb < 2.0 {
        return None;
    }
    let se2 = va / na + vb / nb;
    if se2 <= 0.0 || !se2.is_finite() {
        // No noise at all: the difference is certain, or there is none.
        return Some(if mb > ma { 0.0 } else { 1.0 });
    }
    let t = (mb - ma) / se2.sqrt();
    let df = se2 * se2 / ((va / na).powi(2) / (na - 1.0) + (vb / nb).powi(2) / (nb - 1.0));
    Some(student_t_upper(t, df))
}

/// P(T > t) for Student's t with `df` degrees of freedom.
pub fn student_t_upper(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(0.5 * df, 0.5, x);
    if t > 0.0 { tail } else { 1.0 - tail }
}

/// Holm–Bonferroni adjusted p-values (same order as the input).
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let mut adjusted = vec![1.0; m];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        let value = ((m - rank) as f64 * p[i]).min(1.0);
        running = running.max(value);
        adjusted[i] = running;
    }
    adjusted
}

fn ln_gamma(x: f64) -> f64 {
    // Lanczos approximation (g = 7, n = 9).
    const COEFFS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = COEFFS[0];
    let t = x + 7.5;
    for (i, c) in COEFFS.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Regularized incomplete beta I_x(a, b).
pub fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// Continued fraction for the incomplete beta (modified Lentz).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    // Keeps the recurrences away from division by zero.
    let nonzero = |v: f64| if v.abs() < 1e-300 { 1e-300 } else { v };
    let mut c = 1.0;
    let mut d = 1.0 / nonzero(1.0 - (a + b) * x / (a + 1.0));
    let mut h = d;
    for m in 1..300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        let aa = m * (b - m) * x / ((a + m2 - 1.0) * (a + m2));
        d = 1.0 / nonzero(1.0 + aa * d);
        c = nonzero(1.0 + aa / c);
        h *= d * c;
        let aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0));
        d = 1.0 / nonzero(1.0 + aa * d);
        c = nonzero(1.0 + aa / c);
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < 1e-12 {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn welch_from_summaries_matches_welch_from_samples() {
        let a = [10.0, 12.0, 11.0, 13.0, 9.0, 10.5];
        let b = [14.0, 15.5, 13.0, 16.0, 14.5, 15.0, 13.5];
        let (ma, va) = mean_var(&a);
        let (mb, vb) = mean_var(&b);
        let from_summary =
            welch_greater_summary((ma, va, a.len() as f64), (mb, vb, b.len() as f64)).unwrap();
        let from_samples = welch_greater(&a, &b).unwrap();
        assert!((from_summary - from_samples).abs() < 1e-12);
        assert!(welch_greater_summary((1.0, 1.0, 1.0), (2.0, 1.0, 5.0)).is_none());
    }

    #[test]
    fn student_t_matches_tables() {
        // Two-sided 95% critical values: t(10) = 2.228, t(30) = 2.042.
        assert!((student_t_upper(2.228, 10.0) - 0.025).abs() < 5e-4);
        assert!((student_t_upper(2.042, 30.0) - 0.025).abs() < 5e-4);
        assert!((student_t_upper(0.0, 5.0) - 0.5).abs() < 1e-9);
        assert!((student_t_upper(-2.228, 10.0) - 0.975).abs() < 5e-4);
    }

    #[test]
    fn welch_detects_shift_and_not_noise() {
        let a = [10.0, 11.0, 9.0, 10.5, 9.5, 10.2, 9.8, 10.1];
        let b: Vec<f64> = a.iter().map(|v| v + 3.0).collect();
        assert!(welch_greater(&a, &b).unwrap() < 1e-6);
        assert!(welch_greater(&b, &a).unwrap() > 0.999);
        let c = [10.1, 9.9, 10.4, 9.6, 10.0, 10.3, 9.7, 10.0];
        assert!(welch_greater(&a, &c).unwrap() > 0.05);
        assert_eq!(welch_greater(&[1.0], &[2.0, 3.0]), None);
        assert_eq!(welch_greater(&[1.0, 1.0], &[2.0, 2.0]), Some(0.0));
    }

    #[test]
    fn holm_adjusts_in_step_down_order() {
        let adjusted = holm(&[0.01, 0.04, 0.03, 0.005]);
        // sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1 -> max(0.06,0.04)=0.06
        let expected = [0.03, 0.06, 0.06, 0.02];
        for (a, e) in adjusted.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{adjusted:?}");
        }
    }
}
