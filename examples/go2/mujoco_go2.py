"""The Unitree Go2 in MuJoCo, built from the go2.urdf that Genesis ships: a second simulator to fly a policy in.

    model = build_model(motors, physics_dt, armature, friction)     one MjModel, shared by every robot
    robot = MujocoGo2(model, torque_limits [12])                       one robot: its own MjData
    robot.motor_angles(), .motor_velocities() [12], .gyro(), .gravity() [3]     what the robot's sensors read
    robot.step(kp, kd, target [12], substeps)                          the PD law at every physics substep
    robot.base_height(), .base_velocity() [3]                          ground truth, to measure with

Motors are numbered as the `motors` names given to build_model (sim2sim.py passes the Unitree SDK's order), so a
controller talks to this robot as it would to the real one's LowCmd / LowState. Nothing here calls Genesis: the
model comes from the URDF, the constants from policy.json. What MuJoCo's URDF loader does not do is done here: it
fixes the first link to the world, so a floating joint is added; it knows no floor, so a plane is added. The URDF's
collision geometry is primitives only (a box body, cylinders, a sphere per foot); its .dae meshes are visual, which
MuJoCo's URDF loader discards.
"""
import importlib.util
import os
import xml.etree.ElementTree as ET

import mujoco
import numpy as np

URDF = "assets/urdf/go2/urdf/go2.urdf"  # in the genesis package
BASE = 1  # the base's body id: body 0 is the world, the floating base comes next


def urdf_path() -> str:
    """Genesis's go2.urdf, found through the package's path without importing genesis."""
    return os.path.join(importlib.util.find_spec("genesis").submodule_search_locations[0], URDF)


def floating_urdf(path) -> str:
    """The URDF's text with a `world` link and a floating joint world -> base: MuJoCo then gives the base a free joint
    instead of welding it to the world."""
    root = ET.parse(path).getroot()
    base = next(link.get("name") for link in root.iter("link") if not any(
        j.find("child").get("link") == link.get("name") for j in root.iter("joint")))
    joint = ET.Element("joint", name="floating_base", type="floating")
    ET.SubElement(joint, "parent", link="world")
    ET.SubElement(joint, "child", link=base)
    root.insert(0, joint)
    root.insert(0, ET.Element("link", name="world"))
    return ET.tostring(root, encoding="unicode")


def build_model(motors, physics_dt, armature, friction) -> mujoco.MjModel:
    """The Go2 on a plane. motors: the 12 joint names in the order the robot numbers its motors (one motor actuator
    each, torque in N m: MujocoGo2 computes the PD torque). armature [kg m^2] on every motor joint; `friction` on every
    geom, as Genesis has it. Robot geoms touch the floor only: Genesis trained without self-collision."""
    spec = mujoco.MjSpec.from_string(floating_urdf(urdf_path()))
    # Masses and inertias as the URDF states them, and nothing else: by default MuJoCo gives a link without an
    # <inertial> (each calf's two calflower links) its geoms' volume at 1000 kg/m^3, 0.189 kg in all, which Genesis
    # does not (15.019 kg either way then).
    spec.compiler.inertiafromgeom = mujoco.mjtInertiaFromGeom.mjINERTIAFROMGEOM_FALSE
    spec.option.timestep = physics_dt
    for geom in spec.geoms:
        geom.friction[0] = friction
        geom.contype, geom.conaffinity = 1, 0  # robot-robot pairs fail both contype & conaffinity tests
    floor = spec.worldbody.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[0, 0, 1])
    floor.friction[0], floor.contype, floor.conaffinity = friction, 1, 1
    for name in motors:
        spec.joint(name).armature = armature
        spec.add_actuator(name=name, target=name, trntype=mujoco.mjtTrn.mjTRN_JOINT)  # gain 1: ctrl is torque
    return spec.compile()


class MujocoGo2:
    """One Go2 in its own MjData: the motors' encoders, the IMU and the motors' PD loop, in motor order."""

    def __init__(self, model: mujoco.MjModel, torque_limits):
        self.model, self.data = model, mujoco.MjData(model)
        joints = [model.actuator_trnid[k, 0] for k in range(model.nu)]  # the motors' joints, in motor order
        self.qpos_idx = np.array([model.jnt_qposadr[j] for j in joints])  # [12] into qpos
        self.qvel_idx = np.array([model.jnt_dofadr[j] for j in joints])  # [12] into qvel
        self.torque_limits = np.asarray(torque_limits, dtype=np.float64)  # [12] N m

    # what the robot's own sensors read
    def motor_angles(self):
        return self.data.qpos[self.qpos_idx].copy()

    def motor_velocities(self):
        return self.data.qvel[self.qvel_idx].copy()

    def gyro(self):
        """Base angular velocity in the base frame [rad/s]: MuJoCo's free joint keeps it there already."""
        return self.data.qvel[3:6].copy()

    def gravity(self):
        """The unit vector of gravity in the base frame, R^T (0, 0, -1): minus the third row of R."""
        return -self.data.xmat[BASE].reshape(3, 3)[2].copy()

    # ground truth, for measuring only
    def base_height(self):
        return float(self.data.qpos[2])

    def base_velocity(self):
        """Base linear velocity in the base frame [m/s] (the free joint's qvel is in the world frame)."""
        return self.data.xmat[BASE].reshape(3, 3).T @ self.data.qvel[:3]

    def place(self, height, angles, quat=(1.0, 0.0, 0.0, 0.0)):
        """Put the robot at (0, 0, height) with joint angles [12] (motor order), at rest."""
        mujoco.mj_resetData(self.model, self.data)
        self.data.qpos[:3], self.data.qpos[3:7] = (0.0, 0.0, height), quat
        self.data.qpos[self.qpos_idx] = angles
        mujoco.mj_forward(self.model, self.data)

    def push(self, velocity_xy):
        """A kick: add velocity_xy [2] (world frame, m/s) to the base's velocity."""
        self.data.qvel[:2] += velocity_xy

    def step(self, kp, kd, target, substeps):
        """Hold the motors' PD command for `substeps` physics steps; the torque is recomputed at each, as a motor
        driver does (and Genesis): kp (target - angle) - kd velocity, clipped to the torque limits. kp, kd, target:
        scalars or [12] in motor order; target may be None where kp is 0."""
        for _ in range(substeps):
            error = 0.0 if target is None else target - self.data.qpos[self.qpos_idx]
            torque = kp * error - kd * self.data.qvel[self.qvel_idx]
            self.data.ctrl[:] = np.clip(torque, -self.torque_limits, self.torque_limits)
            mujoco.mj_step(self.model, self.data)
