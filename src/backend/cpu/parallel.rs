//! A pointer that parallel tasks write through at disjoint indices.
//!
//! The scans and the conv split their work by (sequence, channel block).
//! Each task writes a set of elements no other task touches (its own
//! channels of its own sequence's rows and of its own slot's state), but
//! those sets interleave in memory, so safe slice splitting cannot express
//! them. `SharedMut` carries the base pointer and length into the tasks;
//! every access is bounds-checked, and disjointness is the caller's promise,
//! stated at each use.

use std::marker::PhantomData;

pub struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: tasks only write disjoint elements (promised at every call site),
// and `T: Send` values may be written from any thread.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    pub fn new(slice: &'a mut [T]) -> Self {
        SharedMut { ptr: slice.as_mut_ptr(), len: slice.len(), _borrow: PhantomData }
    }

    /// A mutable sub-slice.
    ///
    /// # Safety
    /// No other task may access `[start, start + len)` while it is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "range {start}+{len} outside {}", self.len);
        // SAFETY: in bounds (checked above); exclusive by the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }

    /// Writes one element.
    ///
    /// # Safety
    /// No other task may access index `i` concurrently.
    pub unsafe fn write(&self, i: usize, value: T) {
        // SAFETY: the caller's promise, passed on.
        unsafe { *self.at(i) = value }
    }

    /// One element, to read or write.
    ///
    /// # Safety
    /// No other task may access index `i` while it is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn at(&self, i: usize) -> &mut T {
        assert!(i < self.len, "index {i} outside {}", self.len);
        // SAFETY: in bounds (checked above); exclusive by the caller's promise.
        unsafe { &mut *self.ptr.add(i) }
    }
}
