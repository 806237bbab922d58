//! placeholder
use crate::error::Error;
use crate::fs::FileSystem;
use crate::read_at::Source;
pub(crate) fn open(_v: Source) -> Result<Box<dyn FileSystem>, Error> {
    Err(Error::UnknownFs { partition: 0 })
}
