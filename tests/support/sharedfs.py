"""A shared filesystem seen from two "nodes": one directory served by sshd over SFTP and
mounted twice with sshfs (FUSE). Each mount is an independent client with its own caches,
so listings and attributes can be stale on one "node" after the other changed them: weaker
than NFS's close-to-open consistency, which makes it an adversarial stand-in for NFS.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from tests.support import free_port


def ensure_installed() -> None:
    if shutil.which("sshfs") and os.path.exists("/usr/sbin/sshd"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "openssh-server", "sshfs"],
        check=True,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )


class SharedFS:
    def __init__(self, base: str, nodes: int = 2) -> None:
        ensure_installed()
        self.base, self.src = base, os.path.join(base, "shared")
        keys = os.path.join(base, "ssh")
        os.makedirs(self.src)
        os.makedirs(keys, mode=0o700)
        os.makedirs("/run/sshd", exist_ok=True)
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(keys, name)], check=True)
        shutil.copy(os.path.join(keys, "client_key.pub"), os.path.join(keys, "authorized_keys"))
        self.port = free_port()
        config = os.path.join(keys, "sshd_config")
        with open(config, "w") as f:
            f.write(
                f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {keys}/host_key\nPidFile {keys}/sshd.pid\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                f"AuthorizedKeysFile {keys}/authorized_keys\nStrictModes no\nUsePAM no\n"
                "Subsystem sftp internal-sftp\nLogLevel ERROR\n"
            )
        self.sshd = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_port()
        self.mounts = []
        for i in range(nodes):
            mnt = os.path.join(base, f"node{i}")
            os.makedirs(mnt)
            opts = f"IdentityFile={keys}/client_key,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes,LogLevel=ERROR"
            subprocess.run(
                ["sshfs", "-p", str(self.port), "-o", opts, f"root@127.0.0.1:{self.src}", mnt],
                check=True,
                capture_output=True,
                timeout=60,
            )
            self.mounts.append(mnt)

    def _wait_port(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start")

    def close(self) -> None:
        for mnt in self.mounts:
            subprocess.run(["fusermount", "-u", "-z", mnt], check=False, capture_output=True)
        self.sshd.terminate()
        self.sshd.wait(timeout=10)
