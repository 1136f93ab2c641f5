// The hierarchical imaging model of zinckin (inference/_model.py: imaging_model with the default
// parameter plan) written in Stan, for scripts/benchmark.py. Same equations (model A, rapid
// equilibrium, models/_dynamics.py), same parameterisation (centred per-cell log-normal effects),
// same priors, same Gaussian likelihood of raw fluorescence, same data. Every density is added
// with target += *_lpdf so that normalising constants are kept and the log density can be
// compared term for term with numpyro's (which keeps them).
//
// The protocol's inputs are piecewise constant (stimulus: exponential from its start), so the ODE
// is integrated segment by segment, restarting at every segment start: the counterpart of the
// jump_ts given to diffrax's step-size controller.
functions {
  vector flux_rhs(real t, vector y, real zo, real iono, real tpen, real stim_on, real t_stim,
                  real zip_vmax, real zip_km, real znt_vmax, real znt_km, real seq_vmax, real seq_km,
                  real leak, real k_stim, real tau_stim, real mt_sites, real mt_kd, real probe_total,
                  real probe_kd, real iono_perm, real tpen_rate) {
    vector[2] dy;
    real zc = exp(fmin(fmax(y[1], -40.0), 25.0));
    real s = stim_on * exp(-fmax(t - t_stim, 0.0) / tau_stim);
    real j_seq = seq_vmax * zc / (seq_km + zc);
    real j_rel = (leak + k_stim * s) * y[2];
    real j_cyt = zip_vmax * zo / (zip_km + zo) - znt_vmax * zc / (znt_km + zc) - j_seq + j_rel
                 + iono_perm * iono * (1000.0 * zo - zc) - tpen_rate * tpen * zc;
    real beta = 1.0 + mt_sites * mt_kd / square(mt_kd + zc) + probe_total * probe_kd / square(probe_kd + zc);
    dy[1] = j_cyt / (zc * beta);
    dy[2] = j_seq - j_rel;
    return dy;
  }
}
data {
  int<lower=1> N;                      // cells
  int<lower=1> T;                      // frames
  vector[T] time_min;
  matrix[N, T] intensity;              // 0 where masked
  array[N, T] int<lower=0, upper=1> observed;
  vector<lower=0>[N] f_min_ref;
  vector<lower=0>[N] f_max_ref;
  vector<lower=0>[N] sigma_ref;
  // protocol: K segments; the solution is needed on the grid G (frames and segment starts)
  int<lower=1> K;
  vector[K] seg_start;
  vector[K] seg_zo_free_uM;            // free extracellular zinc (0 under TPEN)
  vector[K] seg_iono;
  vector[K] seg_tpen;
  vector[K] seg_stim_on;               // 1 from the stimulus segment on
  real zo_baseline_uM;
  real t_stim;
  int<lower=1> G;
  array[G] real grid;                    // grid[1] = protocol start
  array[K] int<lower=1, upper=G> seg_first;  // first grid index strictly after the segment start
  array[K] int<lower=1, upper=G> seg_last;   // grid index of the segment's end
  array[T] int<lower=1, upper=G> frame_at;   // grid index of each frame
  // fixed constants (prior medians)
  real probe_total; real mt_sites; real mt_kd; real seq_vmax; real seq_km; real store_rest; real iono_perm;
  // priors: log-normal (median, log sd) of the sampled population constants, in this order:
  // zc_rest, zip_vmax, zip_km, znt_km, release_stim, stim_decay, probe_kd, tpen_rate
  vector[8] prior_median;
  vector[8] prior_log_sd;
  real<lower=0> population_sd_scale;
  real<lower=0> obs_log_sd;
  real<lower=0> rtol;
  real<lower=0> atol;
  int<lower=1> max_num_steps;
}
transformed data {
  vector[N] log_range_ref = log(f_max_ref ./ f_min_ref);
}
parameters {
  real<lower=0> zc_rest_nM;
  real<lower=0> zc_rest_nM_sd_log;
  vector<lower=0>[N] zc_rest_nM_cell;
  real<lower=0> zip_vmax_nM_per_min;
  real<lower=0> zip_vmax_nM_per_min_sd_log;
  vector<lower=0>[N] zip_vmax_nM_per_min_cell;
  real<lower=0> zip_km_uM;
  real<lower=0> znt_km_nM;
  real<lower=0> release_stim_per_min;
  real<lower=0> release_stim_per_min_sd_log;
  vector<lower=0>[N] release_stim_per_min_cell;
  real<lower=0> stim_decay_min;
  real<lower=0> probe_kd_nM;
  real<lower=0> tpen_rate_per_min;
  vector<lower=0>[N] f_min;
  vector[N] log_dynamic_range;
  vector[N] bleach_rate_per_min;
  vector<lower=0>[N] sigma;
}
model {
  // population constants
  target += lognormal_lpdf(zc_rest_nM | log(prior_median[1]), prior_log_sd[1]);
  target += lognormal_lpdf(zip_vmax_nM_per_min | log(prior_median[2]), prior_log_sd[2]);
  target += lognormal_lpdf(zip_km_uM | log(prior_median[3]), prior_log_sd[3]);
  target += lognormal_lpdf(znt_km_nM | log(prior_median[4]), prior_log_sd[4]);
  target += lognormal_lpdf(release_stim_per_min | log(prior_median[5]), prior_log_sd[5]);
  target += lognormal_lpdf(stim_decay_min | log(prior_median[6]), prior_log_sd[6]);
  target += lognormal_lpdf(probe_kd_nM | log(prior_median[7]), prior_log_sd[7]);
  target += lognormal_lpdf(tpen_rate_per_min | log(prior_median[8]), prior_log_sd[8]);
  // between-cell spreads (half-normal) and centred per-cell constants
  target += normal_lpdf(zc_rest_nM_sd_log | 0, population_sd_scale) + log2();
  target += normal_lpdf(zip_vmax_nM_per_min_sd_log | 0, population_sd_scale) + log2();
  target += normal_lpdf(release_stim_per_min_sd_log | 0, population_sd_scale) + log2();
  target += lognormal_lpdf(zc_rest_nM_cell | log(zc_rest_nM), zc_rest_nM_sd_log);
  target += lognormal_lpdf(zip_vmax_nM_per_min_cell | log(zip_vmax_nM_per_min), zip_vmax_nM_per_min_sd_log);
  target += lognormal_lpdf(release_stim_per_min_cell | log(release_stim_per_min), release_stim_per_min_sd_log);
  // observation parameters
  target += lognormal_lpdf(f_min | log(f_min_ref), obs_log_sd);
  target += normal_lpdf(log_dynamic_range | log(expm1(log_range_ref)), obs_log_sd);
  target += normal_lpdf(bleach_rate_per_min | 0, 0.02);
  target += lognormal_lpdf(sigma | log(sigma_ref), 1.0);

  for (i in 1:N) {
    real zc0 = zc_rest_nM_cell[i];
    real zip_vmax = zip_vmax_nM_per_min_cell[i];
    real j_zip0 = zip_vmax * zo_baseline_uM / (zip_km_uM + zo_baseline_uM);
    real znt_vmax = j_zip0 * (znt_km_nM + zc0) / zc0;
    real leak = seq_vmax * zc0 / (seq_km + zc0) / store_rest;
    array[G] vector[2] y;
    y[1] = [log(zc0), store_rest]';
    for (k in 1:K) {
      real t0 = k == 1 ? grid[1] : seg_start[k];
      vector[2] start = y[seg_first[k] - 1];
      array[seg_last[k] - seg_first[k] + 1] vector[2] sol = ode_rk45_tol(
          flux_rhs, start, t0, grid[seg_first[k]:seg_last[k]], rtol, atol, max_num_steps,
          seg_zo_free_uM[k], seg_iono[k], seg_tpen[k], seg_stim_on[k], t_stim,
          zip_vmax, zip_km_uM, znt_vmax, znt_km_nM, seq_vmax, seq_km, leak,
          release_stim_per_min_cell[i], stim_decay_min, mt_sites, mt_kd, probe_total, probe_kd_nM,
          iono_perm, tpen_rate_per_min);
      for (g in seg_first[k]:seg_last[k]) y[g] = sol[g - seg_first[k] + 1];
    }
    {
      real f_max = f_min[i] * (1 + exp(log_dynamic_range[i]));
      for (j in 1:T) {
        if (observed[i, j] == 1) {
          real zc = exp(y[frame_at[j]][1]);
          real f = exp(-bleach_rate_per_min[i] * (time_min[j] - grid[1]))
                   * (f_min[i] + (f_max - f_min[i]) * zc / (probe_kd_nM + zc));
          target += normal_lpdf(intensity[i, j] | f, sigma[i]);
        }
      }
    }
  }
}
