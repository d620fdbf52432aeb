"""The Crazyflie in MuJoCo: a second simulator, one the policy never trained in (preflight.py flies it).

    controller (C, every 1 ms tick) -> [Drones.step(normalized forces [K, 4]): delay, motor lag, thrust, pushes,
                                        one 1 ms MuJoCo step of K drones] -> Drones.sense() -> controller

Written from cf2x.urdf, the file Genesis's drone is built from (mass, inertia, propeller positions, kf, km and the
thrust-to-weight ratio of its <properties>), and from the propeller model stated in env.py (thrust kf rpm^2 along
the propeller's axis at its position, drag torque km rpm^2 about it, the spin of each), never by calling Genesis: an
independent check. K drones fly in one MjModel without touching each other; the physics runs at the firmware's
1 kHz stabilizer rate (Genesis's at 200 Hz). The gaps of crazyflie_env.py apply here too, with its settings' names
and meaning: per drone and episode a motor time constant, a delay in control steps, mass and thrust errors, and at
every tick sensor noise and random pushes.
"""
import importlib.util
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import mujoco
import numpy as np

TICK_S = 0.001  # the stabilizer loop's period: 1 kHz
GRAVITY = 9.81  # [m/s^2], as in Genesis's scene
SPIN = (-1, 1, -1, 1)  # the sign of propellers 0-3's drag torque on the body about z, as Genesis's Drone applies it
#                        (-1: the reaction to a propeller turning counter-clockwise seen from above)
START = (0.0, 0.0, 1.0)  # every episode starts here, level and at rest, as HoverConfig's init_pos


def urdf_path() -> str:
    """cf2x.urdf as the installed genesis-world ships it (found without importing genesis)."""
    spec = importlib.util.find_spec("genesis")
    if spec is None:
        raise FileNotFoundError("genesis-world is not installed: cf2x.urdf comes with it (pip install genesis-world)")
    return os.path.join(spec.submodule_search_locations[0], "assets", "urdf", "drones", "cf2x.urdf")


@dataclass(frozen=True)
class Airframe:
    """What the URDF says of the drone."""
    mass: float  # [kg]
    inertia: tuple  # the diagonal [kg m^2]
    propellers: tuple  # ((x, y) [m] in the body frame, x ahead, y left) for propellers 0-3
    kf: float  # thrust per propeller [N] = kf rpm^2
    km: float  # drag torque [N m] = km rpm^2
    thrust2weight: float  # all four propellers at full power lift this many times the weight

    @property
    def max_thrust(self) -> float:  # one propeller at full power [N]
        return self.thrust2weight * self.mass * GRAVITY / 4


def read_urdf(path: str = None) -> Airframe:
    root = ET.parse(path or urdf_path()).getroot()
    links = {link.get("name"): link.find("inertial") for link in root.iter("link")}
    base, props = links["base_link"], root.find("properties").attrib
    inertia = base.find("inertia").attrib
    xyz = [tuple(float(v) for v in links[f"prop{i}_link"].find("origin").get("xyz").split()[:2]) for i in range(4)]
    return Airframe(mass=float(base.find("mass").get("value")),
                    inertia=tuple(float(inertia[k]) for k in ("ixx", "iyy", "izz")), propellers=tuple(xyz),
                    kf=float(props["kf"]), km=float(props["km"]), thrust2weight=float(props["thrust2weight"]))


def mjcf(airframe: Airframe, count: int) -> str:
    """K free drones, no floor (a crash ends the episode at 0.1 m) and no contacts."""
    inertia = " ".join(f"{v:.9g}" for v in airframe.inertia)
    bodies = "".join(f"""
    <body name="drone{k}" pos="{START[0]} {START[1]} {START[2]}">
      <freejoint/>
      <inertial pos="0 0 0" mass="{airframe.mass}" diaginertia="{inertia}"/>
      <geom type="cylinder" size="0.06 0.0125" contype="0" conaffinity="0"/>
    </body>""" for k in range(count))
    return f"""<mujoco model="cf2x x{count}">
  <option timestep="{TICK_S}" gravity="0 0 {-GRAVITY}" integrator="Euler"/>
  <size memory="{1 + count // 256}M"/>
  <worldbody>{bodies}
  </worldbody>
</mujoco>"""


def cross(a, b):  # [K, 3] x [K, 3], written out: np.cross costs ten times as much on rows of 3
    ax, ay, az, bx, by, bz = a[:, 0], a[:, 1], a[:, 2], b[:, 0], b[:, 1], b[:, 2]
    return np.stack((ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx), 1)


def quat_rotate(q, v):
    """v [K, 3] rotated by unit quaternions q [K, 4] (w, x, y, z): R(q) v."""
    w, u = q[:, :1], q[:, 1:]
    t = 2.0 * cross(u, v)
    return v + w * t + cross(u, t)


def quat_mul(p, q):
    pw, pv, qw, qv = p[:, :1], p[:, 1:], q[:, :1], q[:, 1:]
    return np.concatenate((pw * qw - (pv * qv).sum(1, keepdims=True), pw * qv + qw * pv + cross(pv, qv)), 1)


class Drones:
    """K Crazyflies under one condition (a dict of crazyflie_env.py's perturbation settings, PERTURBATIONS' shape).
    step() takes the controller's normalized forces (the firmware's motor command, 0 to 1 of a propeller's full
    thrust) at every tick; sense() returns the state estimate and gyro the firmware would give."""

    def __init__(self, count: int, condition: dict, seed: int, control_ticks: int = 10, airframe: Airframe = None):
        self.K, self.condition, self.control_ticks = count, condition, control_ticks
        self.frame = airframe or read_urdf()
        self.model = mujoco.MjModel.from_xml_string(mjcf(self.frame, count))
        self.data = mujoco.MjData(self.model)
        self.rng = np.random.default_rng(seed)
        self.body = np.arange(1, count + 1)  # MuJoCo's body ids (0 is the world)
        K, frame = count, self.frame
        self.arm = np.array([(y, -x, 0.0) for x, y in frame.propellers])  # r x (0, 0, f) = f (y, -x, 0) [4, 3]
        self.weight = frame.mass * GRAVITY
        longest = condition["action_delay"][1] * control_ticks
        self.commands = np.zeros((longest + 1, K, 4))  # the last few ticks' commands, a ring
        self.ticks = 0
        self.delay = np.zeros(K, dtype=int)  # [K] in ticks
        self.lag = np.ones((K, 1))  # [K, 1] the RPM's step toward its command per tick
        self.thrust_scale = np.ones((K, 1))
        self.mass_scale = np.ones((K, 1))  # mass and inertia x this: every force and torque / this (see step)
        self.rpm = np.zeros((K, 4))
        self.wrench = np.zeros((K, 6))  # the push now: force [N], torque [N m], world frame
        self.push_left = np.zeros(K, dtype=int)  # ticks until the next push is drawn
        self.reset(np.ones(K, dtype=bool))

    def _uniform(self, low_high, n):
        low, high = low_high
        return self.rng.uniform(low, high, n)

    def reset(self, envs):
        """envs [K] bool: these drones start an episode at START, level, at rest, with their gaps drawn anew and
        their propellers at rest (the controller's warm-up spins them up)."""
        n, c = int(envs.sum()), self.condition
        if n == 0:
            return
        qpos, qvel = self.data.qpos.reshape(self.K, 7), self.data.qvel.reshape(self.K, 6)
        qpos[envs] = (*START, 1.0, 0.0, 0.0, 0.0)
        qvel[envs] = 0.0
        self.mass_scale[envs, 0] = self._uniform(c["mass_scale"], n)
        self.thrust_scale[envs, 0] = self._uniform(c["thrust_scale"], n)
        tau = self._uniform(c["motor_lag_s"], n)
        self.lag[envs, 0] = np.where(tau > 0, -np.expm1(-TICK_S / np.maximum(tau, 1e-9)), 1.0)
        low, high = c["action_delay"]
        self.delay[envs] = self.rng.integers(low, high + 1, n) * self.control_ticks
        self.rpm[envs] = 0.0
        self.commands[:, envs] = 0.0
        self.push_left[envs] = 0

    def sense(self):
        """The firmware's view: position [K, 3] (m, world), velocity [K, 3] (m/s, world), attitude quaternion
        [K, 4] (w, x, y, z, body to world) and gyro [K, 3] (rad/s, body), each with the condition's noise."""
        qpos, qvel = self.data.qpos.reshape(self.K, 7), self.data.qvel.reshape(self.K, 6)
        pos, quat, vel, gyro = qpos[:, :3].copy(), qpos[:, 3:].copy(), qvel[:, :3].copy(), qvel[:, 3:].copy()
        sigma_pos, sigma_vel, sigma_deg, sigma_gyro = self.condition["obs_noise"]
        if sigma_pos or sigma_vel or sigma_deg or sigma_gyro:
            noise = self.rng.standard_normal((4, self.K, 3))
            pos += sigma_pos * noise[0]
            vel += sigma_vel * noise[1]  # (isotropic: the same in the body frame, where Genesis adds it)
            gyro += sigma_gyro * noise[3]
            turn = np.concatenate((np.ones((self.K, 1)), noise[2] * math.radians(sigma_deg) / 2), 1)
            quat = quat_mul(quat, turn)
            quat /= np.linalg.norm(quat, axis=1, keepdims=True)
        return pos, vel, quat, gyro

    def step(self, forces):
        """forces [K, 4]: the controller's normalized forces this tick, in propeller order; one 1 ms step."""
        frame, K = self.frame, self.K
        ring = self.commands.shape[0]
        self.ticks += 1
        self.commands[self.ticks % ring] = np.clip(forces, 0.0, 1.0)  # (the firmware's power distribution clips)
        late = self.commands[(self.ticks - self.delay) % ring, np.arange(K)]  # [K, 4]
        rpm_command = np.sqrt(late * frame.max_thrust / frame.kf)
        self.rpm += self.lag * (rpm_command - self.rpm)  # the motors' first-order lag
        square = self.rpm ** 2 * self.thrust_scale  # [K, 4]
        thrust = frame.kf * square
        torque_body = thrust @ self.arm + np.outer(frame.km * square @ np.array(SPIN, float), (0.0, 0.0, 1.0))
        quat = self.data.qpos.reshape(K, 7)[:, 3:]
        force_body = np.zeros((K, 3))
        force_body[:, 2] = thrust.sum(1)
        self._push()
        # A drone m times heavier, inertia included, is the nominal body with every force and torque but gravity
        # divided by m (MuJoCo's masses changed at run time would need mj_setConst per reset, slow for many drones).
        applied = self.data.xfrc_applied[1:]  # [K, 6] world frame, at each body's centre of mass
        applied[:, :3] = (quat_rotate(quat, force_body) + self.wrench[:, :3]) / self.mass_scale
        applied[:, 3:] = (quat_rotate(quat, torque_body) + self.wrench[:, 3:]) / self.mass_scale
        mujoco.mj_step(self.model, self.data)

    def _push(self):
        c = self.condition
        if not (c["push_force"] or c["push_torque"]):
            return
        self.push_left -= 1
        new = self.push_left <= 0
        n = int(new.sum())
        if n:
            sigma = np.repeat((c["push_force"] * self.weight, c["push_torque"]), 3)  # (the nominal weight, in N)
            self.wrench[new] = self.rng.standard_normal((n, 6)) * sigma
            self.push_left[new] = np.round(self._uniform(c["push_interval_s"], n) / TICK_S).astype(int)

    def hold(self, envs):
        """envs [K] bool: keep these drones at START, at rest (in a hand, while their controller warms up)."""
        self.data.qpos.reshape(self.K, 7)[envs] = (*START, 1.0, 0.0, 0.0, 0.0)
        self.data.qvel.reshape(self.K, 6)[envs] = 0.0
