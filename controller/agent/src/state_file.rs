//! The agent's state directory: one JSON file, read at start so identities, endpoints and
//! policies survive restarts, and written atomically after every change by a thread of its own,
//! so the engine never waits on the disk.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use palisade_engine::fqdn::FqdnEntry;
use palisade_engine::store::{PersistError, STATE_VERSION, SaveTicket, StateFile, StateStore};
use tokio::sync::oneshot;
use tracing::{error, info};

const FILE: &str = "state.json";
/// What DNS answers taught since the last save, one JSON line per batch (see
/// `StateStore::record_learned`).
const JOURNAL: &str = "fqdns.journal";

/// One batch of the journal: the entries, and the generation of the first save that has them.
#[derive(serde::Serialize, serde::Deserialize)]
struct JournalLine {
    generation: u64,
    entries: Vec<FqdnEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state file {path} has version {found}, this agent reads version {STATE_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path} line {line} is corrupt: {source}")]
    Journal {
        path: PathBuf,
        line: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("the state writer has stopped")]
    WriterStopped,
}

/// The state file in its directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: &Path) -> Result<Self, StateFileError> {
        fs::create_dir_all(dir).map_err(|source| StateFileError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    pub fn load(&self) -> Result<Option<StateFile>, StateFileError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateFileError::Io { path, source }),
        };
        let state: StateFile =
            serde_json::from_slice(&bytes).map_err(|source| StateFileError::Corrupt {
                path: path.clone(),
                source,
            })?;
        if state.version != STATE_VERSION {
            return Err(StateFileError::Version {
                path,
                found: state.version,
            });
        }
        let mut state = state;
        state.fqdns.extend(self.journal_after(state.generation)?);
        Ok(Some(state))
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL)
    }

    /// Cuts a last line that a dead agent left short off the journal, so the lines appended
    /// from now on start on lines of their own.
    fn drop_torn_tail(&self) -> Result<(), StateFileError> {
        let path = self.journal_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StateFileError::Io { path, source }),
        };
        if bytes.is_empty() || bytes.ends_with(b"\n") {
            return Ok(());
        }
        let keep = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(keep as u64))
            .map_err(|source| StateFileError::Io { path, source })
    }

    /// The journal's entries of batches the save of `generation` did not have. A last line
    /// cut short is a batch whose write the agent did not live to finish: its answers were
    /// never released, so it is left out.
    fn journal_after(&self, generation: u64) -> Result<Vec<FqdnEntry>, StateFileError> {
        let path = self.journal_path();
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(StateFileError::Io { path, source }),
        };
        let mut out = Vec::new();
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<JournalLine>(line) {
                Ok(l) if l.generation > generation => out.extend(l.entries),
                Ok(_) => {}
                Err(_) if i + 1 == lines.len() && !complete => {}
                Err(source) => {
                    return Err(StateFileError::Journal {
                        path,
                        line: i + 1,
                        source,
                    });
                }
            }
        }
        Ok(out)
    }

    /// Writes to a temporary file, syncs, then renames: a crash leaves the old or the new
    /// state, never half of one.
    pub fn save(&self, state: &StateFile) -> Result<(), StateFileError> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let io_err = |source| StateFileError::Io {
            path: tmp.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(state).map_err(|source| StateFileError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let mut f = fs::File::create(&tmp).map_err(io_err)?;
        f.write_all(&json).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        fs::rename(&tmp, &path).map_err(|source| StateFileError::Io { path, source })
    }
}

/// What waits to be written: the newest state only (an older one is never worth writing once
/// a newer exists), the generation of each save, and who waits to hear of which.
#[derive(Default)]
struct Queue {
    pending: Option<(u64, StateFile)>,
    next_generation: u64,
    waiters: Vec<(u64, oneshot::Sender<Result<(), PersistError>>)>,
    writing: bool,
    closed: bool,
    /// The journal, open for appending, and the generation of the save that covers all of it
    /// (0: it is empty).
    journal: Option<fs::File>,
    journal_covered_by: u64,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The engine's store: hands each state to the writer thread and returns at once, with a
/// ticket that tells the change's caller when that state (or a newer one) is on disk.
pub struct FileStore {
    dir: StateDir,
    shared: Arc<Shared>,
}

/// Waits for the writer: the agent flushes before it exits, so a clean stop loses nothing.
#[derive(Clone)]
pub struct FileStoreFlusher {
    shared: Arc<Shared>,
}

impl FileStore {
    pub fn start(dir: StateDir) -> std::io::Result<(Self, FileStoreFlusher)> {
        let shared = Arc::new(Shared::default());
        let writer_shared = Arc::clone(&shared);
        let writer_dir = dir.clone();
        std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || write_loop(&writer_dir, &writer_shared))?;
        Ok((
            Self {
                dir,
                shared: Arc::clone(&shared),
            },
            FileStoreFlusher { shared },
        ))
    }
}

fn write_loop(dir: &StateDir, shared: &Shared) {
    let mut last_error: Option<String> = None;
    loop {
        let (generation, state) = {
            let mut q = shared.lock();
            loop {
                if let Some(p) = q.pending.take() {
                    q.writing = true;
                    break p;
                }
                if q.closed {
                    return;
                }
                q = shared
                    .changed
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        let result = dir.save(&state).map_err(Arc::new);
        if result.is_ok() {
            let mut q = shared.lock();
            if q.journal_covered_by != 0 && q.journal_covered_by <= generation {
                // Everything in the journal is in the file now.
                let emptied = match &q.journal {
                    Some(f) => f.set_len(0),
                    // Written by an agent before this one.
                    None => fs::OpenOptions::new()
                        .write(true)
                        .open(dir.journal_path())
                        .and_then(|f| f.set_len(0)),
                };
                match emptied {
                    Ok(()) => q.journal_covered_by = 0,
                    Err(e) => {
                        error!(error = %e, "cannot empty the learned names' journal; it keeps growing until a later save empties it");
                    }
                }
            }
        }
        match &result {
            Ok(()) => {
                if last_error.take().is_some() {
                    info!(dir = %dir.dir.display(), "state saved again");
                }
            }
            Err(e) => {
                // Said once per distinct problem; the next change tries again.
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    error!(error = %msg, "state not saved; the running agent enforces it, a restarted agent would not know it");
                    last_error = Some(msg);
                }
            }
        }
        let mut q = shared.lock();
        q.writing = false;
        // Everyone waiting on this state or an older one has their answer: a newer state
        // includes theirs.
        let (done, waiting): (Vec<_>, Vec<_>) =
            q.waiters.drain(..).partition(|(g, _)| *g <= generation);
        q.waiters = waiting;
        drop(q);
        for (_, tx) in done {
            let _ = tx.send(result.clone().map_err(PersistError::new));
        }
        shared.changed.notify_all();
    }
}

impl StateStore for FileStore {
    fn load(&mut self) -> Result<Option<StateFile>, PersistError> {
        let state = self.dir.load().map_err(PersistError::new)?;
        self.dir.drop_torn_tail().map_err(PersistError::new)?;
        let mut q = self.shared.lock();
        // Saves go on counting from the loaded one, so the journal's lines stay ordered
        // against it; what the journal holds is in the engine's state from now on, and in
        // the first save (the engine saves as it starts).
        q.next_generation = state.as_ref().map_or(0, |s| s.generation);
        if let Ok(f) = fs::File::open(self.dir.journal_path())
            && f.metadata().is_ok_and(|m| m.len() > 0)
        {
            q.journal_covered_by = q.next_generation + 1;
        }
        Ok(state)
    }

    fn record_learned(&mut self, entries: &[FqdnEntry]) -> Result<(), PersistError> {
        let path = self.dir.journal_path();
        let io = |source| {
            PersistError::new(StateFileError::Io {
                path: path.clone(),
                source,
            })
        };
        let mut q = self.shared.lock();
        // The next save has them (the engine's state already does).
        let generation = q.next_generation + 1;
        let mut line = serde_json::to_vec(&JournalLine {
            generation,
            entries: entries.to_vec(),
        })
        .map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        if q.journal.is_none() {
            q.journal = Some(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(io)?,
            );
        }
        if let Some(f) = &mut q.journal {
            // One write: a line is in the page cache whole, or (the agent died in it) cut
            // short and left out at the next start, its answers never released.
            f.write_all(&line).map_err(io)?;
        }
        q.journal_covered_by = generation;
        Ok(())
    }

    fn save(&mut self, state: StateFile) -> SaveTicket {
        let (tx, ticket) = SaveTicket::pending();
        let mut q = self.shared.lock();
        if q.closed {
            return SaveTicket::done(Err(PersistError::new(StateFileError::WriterStopped)));
        }
        q.next_generation += 1;
        let generation = q.next_generation;
        let mut state = state;
        state.generation = generation;
        q.pending = Some((generation, state));
        q.waiters.push((generation, tx));
        drop(q);
        self.shared.changed.notify_all();
        ticket
    }
}

impl FileStoreFlusher {
    /// Blocks until everything handed to the store is written (or failed to be), then stops
    /// the writer.
    pub fn flush_and_stop(&self) {
        let mut q = self.shared.lock();
        while q.pending.is_some() || q.writing {
            q = self
                .shared
                .changed
                .wait(q)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        q.closed = true;
        drop(q);
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("palisade-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn saved_state_is_read_back_after_a_flush() {
        let d = dir("state-roundtrip");
        let (mut store, flusher) = FileStore::start(StateDir::new(&d).unwrap()).unwrap();
        assert_eq!(store.load().unwrap(), None);
        let mut tickets = Vec::new();
        for n in 1..=3 {
            tickets.push(store.save(StateFile {
                version: STATE_VERSION,
                next_endpoint_id: n,
                ..StateFile::default()
            }));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for t in tickets {
            rt.block_on(t.wait())
                .expect("every save is answered, by its state or a newer one");
        }
        flusher.flush_and_stop();
        let back = StateDir::new(&d).unwrap().load().unwrap().unwrap();
        assert_eq!(back.next_endpoint_id, 3, "the newest state wins");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_save_that_cannot_be_written_is_answered_with_why() {
        let d = dir("state-unwritable");
        let sd = StateDir::new(&d).unwrap();
        // The temporary file's place is taken by a directory: the write fails.
        fs::create_dir_all(d.join(format!("{FILE}.tmp"))).unwrap();
        let (mut store, flusher) = FileStore::start(sd).unwrap();
        let ticket = store.save(StateFile::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = rt.block_on(ticket.wait()).unwrap_err();
        assert!(err.to_string().contains("state.json.tmp"), "{err}");
        flusher.flush_and_stop();
        let late = store.save(StateFile::default());
        assert!(
            rt.block_on(late.wait()).is_err(),
            "a stopped writer says so"
        );
        let _ = fs::remove_dir_all(&d);
    }

    fn entry(n: u8, expires: u64) -> FqdnEntry {
        FqdnEntry {
            endpoint: palisade_policies::endpoint::EndpointId(1),
            name: format!("n{n}.example.test"),
            address: std::net::Ipv4Addr::new(192, 0, 2, n),
            expires,
        }
    }

    #[test]
    fn learned_names_recorded_after_the_last_save_survive_an_agent_that_dies() {
        let d = dir("state-journal");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let (mut store, flusher) = FileStore::start(StateDir::new(&d).unwrap()).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store.record_learned(&[entry(1, 100)]).unwrap();
        let saved = StateFile {
            version: STATE_VERSION,
            fqdns: vec![entry(1, 100)],
            ..StateFile::default()
        };
        rt.block_on(store.save(saved).wait()).unwrap();
        flusher.flush_and_stop();
        assert_eq!(
            fs::metadata(d.join(JOURNAL)).unwrap().len(),
            0,
            "a save that has everything empties the journal"
        );
        // Recorded, then the agent dies before any save has it (and in the middle of a
        // write: a line cut short).
        store
            .record_learned(&[entry(2, 200), entry(3, 300)])
            .unwrap();
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(d.join(JOURNAL))
            .unwrap();
        f.write_all(br#"{"generation": 2, "entr"#).unwrap();
        drop((store, f));

        let (mut store, flusher) = FileStore::start(StateDir::new(&d).unwrap()).unwrap();
        let back = store.load().unwrap().unwrap();
        assert_eq!(
            back.fqdns,
            vec![entry(1, 100), entry(2, 200), entry(3, 300)],
            "the save's entries, then the journal's after it (once each)"
        );
        // What the restarted agent records goes on a line of its own.
        store.record_learned(&[entry(4, 400)]).unwrap();
        assert_eq!(
            StateDir::new(&d)
                .unwrap()
                .load()
                .unwrap()
                .unwrap()
                .fqdns
                .len(),
            4
        );
        // The restarted engine saves what it started with: the journal is empty again, and
        // a line of it that is not the last one cut short is refused by name.
        rt.block_on(store.save(back.clone()).wait()).unwrap();
        flusher.flush_and_stop();
        assert_eq!(fs::metadata(d.join(JOURNAL)).unwrap().len(), 0);
        assert_eq!(
            StateDir::new(&d).unwrap().load().unwrap().unwrap().fqdns,
            back.fqdns
        );
        fs::write(d.join(JOURNAL), "{not json\n{}\n").unwrap();
        let e = StateDir::new(&d).unwrap().load().unwrap_err();
        assert!(
            e.to_string().contains("fqdns.journal line 1 is corrupt"),
            "{e}"
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_refused_by_name() {
        let d = dir("state-corrupt");
        let sd = StateDir::new(&d).unwrap();
        fs::write(d.join(FILE), b"{not json").unwrap();
        let e = sd.load().unwrap_err();
        assert!(e.to_string().contains("is corrupt"), "{e}");
        fs::write(d.join(FILE), br#"{"version": 99, "endpoints": [], "namespaces": {}, "policies": [], "identities": {"workloads": [], "next_workload": 256}, "next_endpoint_id": 1}"#).unwrap();
        let e = sd.load().unwrap_err();
        assert!(e.to_string().contains("has version 99"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }
}
