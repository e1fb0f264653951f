"""The vSphere source: back up a VM's disks from a snapshot, reading only what
Changed Block Tracking says changed (pyvmomi).

    url.py       vsphere://USER@HOST[:PORT]/DATACENTER/vm/PATH, the password
                 (HYPERSDK_VSPHERE_PASSWORD or a 0600 credentials file, never argv)
    session.py   log in over verified TLS (or --insecure / --ca-file), one clear
                 line per failure; HTTPS GETs with the session cookie
    vm.py        find the VM, its disks and configuration, tasks, CBT, snapshots
                 (named so hypersdk recognises its own and removes what a killed
                 run left), QueryChangedDiskAreas looped on startOffset
    export.py    an ExportSnapshot lease and one disk's bytes: Range reads of raw
                 exports (vcsim), one pass through a streamOptimized VMDK
                 (vCenter's NFC; node/sources/vmdk.py), chosen by the content
    source.py    one disk as an image source for the chunker: holes and unchanged
                 chunks are never read (unchanged ones keep the previous backup's ids)

Everything here is blocking (pyvmomi is); the service runs it in a worker thread.
"""
