//! The state-slot allocator: which slots of the pool are free.

/// Hands out slot indices `0..n`. A slot is taken on admission and given
/// back on finish, error or cancellation; `free + used == n` always.
#[derive(Debug)]
pub struct SlotAllocator {
    free: Vec<usize>,
    used: Vec<bool>,
}

impl SlotAllocator {
    pub fn new(n: usize) -> Self {
        // Lowest index first out, so a lightly loaded server reuses slot 0.
        SlotAllocator { free: (0..n).rev().collect(), used: vec![false; n] }
    }

    pub fn take(&mut self) -> Option<usize> {
        let s = self.free.pop()?;
        self.used[s] = true;
        Some(s)
    }

    /// Returns a slot. Returning a slot that is not in use is a bug.
    pub fn give_back(&mut self, slot: usize) {
        assert!(self.used[slot], "slot {slot} given back twice: this is a bug");
        self.used[slot] = false;
        self.free.push(slot);
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    pub fn used(&self) -> usize {
        self.used.len() - self.free.len()
    }

    pub fn total(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_and_give_back_keep_the_books() {
        let mut a = SlotAllocator::new(3);
        let x = a.take().expect("free");
        let y = a.take().expect("free");
        assert_ne!(x, y);
        assert_eq!((a.free(), a.used()), (1, 2));
        a.give_back(x);
        assert_eq!(a.take(), Some(x));
        assert!(a.take().is_some());
        assert_eq!(a.take(), None);
        assert_eq!(a.free() + a.used(), a.total());
    }

    #[test]
    #[should_panic(expected = "given back twice")]
    fn double_free_is_caught() {
        let mut a = SlotAllocator::new(2);
        let x = a.take().expect("free");
        a.give_back(x);
        a.give_back(x);
    }
}
