//! "Busyness" (the seed's term): host threads burning CPU while a run measures, to see
//! what interference does to each rule.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// N spinning threads, stopped and joined on drop.
pub struct Busy {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Busy {
    pub fn start(threads: usize) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut busy = Self {
            stop: stop.clone(),
            threads: Vec::with_capacity(threads),
        };
        for i in 0..threads {
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vmm-busy-{i}"))
                .spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Integer work the optimiser cannot drop.
                        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                    }
                })?;
            busy.threads.push(thread);
        }
        Ok(busy)
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_threads_run_until_dropped() {
        let busy = Busy::start(2).unwrap();
        assert_eq!(busy.threads(), 2);
        std::thread::sleep(std::time::Duration::from_millis(10));
        assert!(busy.threads.iter().all(|t| !t.is_finished()));
        drop(busy);
    }
}
