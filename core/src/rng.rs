//! All of the core's randomness, from one seed.
//!
//! str0m draws ICE credentials, SSRCs, STUN transaction ids and its tie-breaker from fastrand's
//! thread-local generator. The agent owns that generator's state: it swaps its own state in
//! before it calls into str0m and takes it back after ([`Str0mRng`]), so two agents on one thread,
//! or an agent moved between threads, each see their own deterministic stream.

use std::time::Duration;

const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Debug)]
pub(crate) struct Rng(fastrand::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(fastrand::Rng::with_seed(seed))
    }

    pub fn u64(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// A random id of `len` characters from `[A-Za-z0-9]`.
    pub fn id(&mut self, len: usize) -> String {
        (0..len)
            .map(|_| {
                // u32, not usize: fastrand draws usize ranges differently on 32-bit targets,
                // and the same seed must give the same ids on armv7 as on x86_64 and aarch64.
                let i = self.0.u32(..ID_ALPHABET.len() as u32) as usize;
                char::from(ID_ALPHABET.get(i).copied().unwrap_or(b'x'))
            })
            .collect()
    }

    /// `d` +- 20 %.
    pub fn jitter(&mut self, d: Duration) -> Duration {
        let factor = 0.8 + 0.4 * self.0.f64();
        d.mul_f64(factor)
    }
}

/// The saved state of fastrand's thread-local generator that str0m uses.
#[derive(Debug)]
pub(crate) struct Str0mRng(u64);

impl Str0mRng {
    pub fn new(seed: u64) -> Self {
        Str0mRng(seed)
    }

    /// Runs `f` with this state installed in the thread-local generator.
    #[allow(clippy::disallowed_methods)] // the one place that seeds str0m's thread-local RNG
    pub fn scope<R>(state: &mut u64, f: impl FnOnce() -> R) -> R {
        let outer = fastrand::get_seed();
        fastrand::seed(*state);
        let r = f();
        *state = fastrand::get_seed();
        fastrand::seed(outer);
        r
    }

    pub fn state_mut(&mut self) -> &mut u64 {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_ids() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        assert_eq!(a.id(12), b.id(12));
        assert_ne!(Rng::new(8).id(12), Rng::new(7).id(12));
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // draws as str0m does, inside the scope
    fn str0m_scope_is_isolated() {
        let mut s1 = 1u64;
        let mut s2 = 1u64;
        let a = Str0mRng::scope(&mut s1, || fastrand::u32(..));
        let _noise = Str0mRng::scope(&mut 99u64, || fastrand::u32(..));
        let b = Str0mRng::scope(&mut s2, || fastrand::u32(..));
        assert_eq!(a, b);
        assert_eq!(s1, s2);
    }
}
