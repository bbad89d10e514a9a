"""Files on disk: atomic writes, output claims and their lock, stale temporaries, JSON files, SHA-256 hashes.

One module per job (import from the module that owns the name):
- atomic: a file or folder appears complete under its name or not at all, with ordinary modes;
- entries: what is at a path (a folder's entries described, an entry removed, a device / FIFO / socket named);
- approvals: the outputs a claim in this process approved for replacement;
- temporaries: what killed runs leave (hidden temporaries, scratch folders, replaced folders);
- lock: the exclusive lock a command holds on its --out;
- outputs: a command's output policy and claim_output, everything it checks before writing --out;
- json_files: JSON written atomically and read with a one-line error;
- hashing: SHA-256 of files and bytes.
"""
