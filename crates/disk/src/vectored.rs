//! Scatter/gather helpers: one request's data spread over several buffers (a guest's
//! scattered pages), as [`BlockBackend::read_vectored_at`](crate::BlockBackend) and
//! [`Storage::read_vectored_at`](crate::Storage) take it.

/// A buffer that can be cut in two: `&mut [u8]` for reads, `&[u8]` for writes.
pub trait Piece: Sized {
    /// Length in bytes.
    fn size(&self) -> usize;
    /// The first `at` bytes and the rest.
    fn cut(self, at: usize) -> (Self, Self);
}

impl Piece for &mut [u8] {
    fn size(&self) -> usize {
        self.len()
    }
    fn cut(self, at: usize) -> (Self, Self) {
        self.split_at_mut(at)
    }
}

impl Piece for &[u8] {
    fn size(&self) -> usize {
        self.len()
    }
    fn cut(self, at: usize) -> (Self, Self) {
        self.split_at(at)
    }
}

/// Hands out a list of buffers front to back, `n` bytes at a time, cutting a buffer where
/// a piece ends inside it.
pub struct Cursor<P> {
    /// Remaining buffers, last first.
    rest: Vec<P>,
}

impl<P: Piece> Cursor<P> {
    /// A cursor over `bufs` (empty ones are skipped).
    pub fn new(bufs: impl IntoIterator<Item = P>) -> Self {
        let mut rest: Vec<P> = bufs.into_iter().filter(|b| b.size() > 0).collect();
        rest.reverse();
        Self { rest }
    }

    /// The next `n` bytes as buffers (fewer if the list runs out first).
    pub fn take(&mut self, mut n: usize) -> Vec<P> {
        let mut out = Vec::new();
        while n > 0 {
            let Some(b) = self.rest.pop() else { break };
            if b.size() <= n {
                n -= b.size();
                out.push(b);
            } else {
                let (head, tail) = b.cut(n);
                out.push(head);
                self.rest.push(tail);
                n = 0;
            }
        }
        out
    }
}

/// Total length of a list of buffers.
pub fn total<P: Piece>(bufs: &[P]) -> usize {
    bufs.iter().map(Piece::size).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_across_and_inside_buffers() {
        let mut a = [1u8; 3];
        let mut b = [2u8; 0];
        let mut c = [3u8; 5];
        let mut cur = Cursor::new([&mut a[..], &mut b[..], &mut c[..]]);
        let p = cur.take(2);
        assert_eq!(p.iter().map(|s| s.len()).collect::<Vec<_>>(), [2]);
        let p = cur.take(4);
        assert_eq!(p.iter().map(|s| s.len()).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(p[1], [3, 3, 3]);
        let p = cur.take(10);
        assert_eq!(p.iter().map(|s| s.len()).collect::<Vec<_>>(), [2]);
        assert!(cur.take(1).is_empty());
    }
}
